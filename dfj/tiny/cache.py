"""Where the trained tiny judges live: built once per machine (`dfj.tiny.training`), then reused."""

from __future__ import annotations

import os
from pathlib import Path

from dfj import prompts


def default_cache() -> Path:
    """dfj's cache folder: `$DFJ_CACHE`, else `~/.cache/dfj`."""
    return Path(os.environ.get("DFJ_CACHE") or Path.home() / ".cache" / "dfj")


def trained_tiny_root(seed: int = 0) -> Path:
    """Build the trained tiny judges for this CPU class on first use (under a lock) and return their
    folder: one build per class, so a machine (or a CI cache) that meets a known class never retrains."""
    import fcntl

    from dfj.tiny.training import TRAINED_VERSION, TrainSettings, build_trained_judges, cpu_class

    cpu = cpu_class()
    root = default_cache() / f"trained-v{TRAINED_VERSION}-seed{seed}-{cpu}"
    if (root / "metrics.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits for the first build
        if not (root / "metrics.json").is_file() and not _adopt_unkeyed(root, root.parent / f"trained-v{TRAINED_VERSION}-seed{seed}", cpu):
            print(f"dfj: training the tiny DFJ judges into {root} (once per CPU class: about 15 minutes on 2 cores "
                  "with AMX, up to 45 without native bf16; progress below)", flush=True)
            build_trained_judges(root, TrainSettings(seed=seed), log=lambda line: print(f"dfj: {line}", flush=True))
    return root


def _adopt_unkeyed(root: Path, legacy: Path, cpu: str) -> bool:
    """A build from before folders named their CPU class is this class's when its recorded kernels and
    head dtype say so: it is renamed, not retrained."""
    import json

    try:
        machine = json.loads((legacy / "metrics.json").read_text())["machine"]
    except (OSError, ValueError, KeyError):
        return False
    aten, _, units = cpu.partition("-")
    if machine.get("aten_cpu_capability", "").lower() != aten or (machine.get("head_dtype") == "bfloat16") != (units != "fp32"):
        return False
    legacy.rename(root)
    return True


def trained_tiny_judge(mode: str, seed: int = 0) -> Path:
    """The trained tiny LoRA judge for `mode` (an adapter folder naming its base)."""
    return trained_tiny_root(seed) / f"{prompts.check_mode(mode)}-adapter"


def trained_tiny_split(mode: str, split: str = "test", seed: int = 0) -> Path:
    """The synthetic DFJ split the trained judges were trained ('train') or evaluated ('test') on."""
    if split not in ("train", "test"):
        raise ValueError("split is 'train' or 'test'")
    return trained_tiny_root(seed) / "splits" / prompts.check_mode(mode) / split
