"""Where the trained tiny judges live: built once per machine (`dfj.tiny.training`), then reused."""

from __future__ import annotations

import os
from pathlib import Path

from dfj import prompts


def default_cache() -> Path:
    """dfj's cache folder: `$DFJ_CACHE`, else `~/.cache/dfj`."""
    return Path(os.environ.get("DFJ_CACHE") or Path.home() / ".cache" / "dfj")


def trained_tiny_root(seed: int = 0) -> Path:
    """Build the trained tiny judges on first use (under a lock) and return their folder."""
    import fcntl

    from dfj.tiny.training import TRAINED_VERSION, TrainSettings, build_trained_judges

    root = default_cache() / f"trained-v{TRAINED_VERSION}-seed{seed}"
    if (root / "metrics.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first build
        if not (root / "metrics.json").is_file():
            print(f"dfj: training the tiny DFJ judges into {root} (once per machine: about 15 minutes on 2 cores with AMX, longer on CPUs without native bf16)")
            build_trained_judges(root, TrainSettings(seed=seed))
    return root


def trained_tiny_judge(mode: str, seed: int = 0) -> Path:
    """The trained tiny LoRA judge for `mode` (an adapter folder naming its base)."""
    return trained_tiny_root(seed) / f"{prompts.check_mode(mode)}-adapter"


def trained_tiny_split(mode: str, split: str = "test", seed: int = 0) -> Path:
    """The synthetic DFJ split the trained judges were trained ('train') or evaluated ('test') on."""
    if split not in ("train", "test"):
        raise ValueError("split is 'train' or 'test'")
    return trained_tiny_root(seed) / "splits" / prompts.check_mode(mode) / split
