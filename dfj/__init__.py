"""dfj: export, quantize, run and verify DeepfakeJudge judges.

`import dfj` stays light (no torch, no transformers): heavy libraries are imported by the runtime
or exporter that needs them, when it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from dfj.judge import Judge

__all__ = ["__version__", "load_judge"]


def load_judge(
    source: str,
    runtime: str = "torch",
    device: str = "cpu",
    dtype: str | None = None,
    mode: str | None = None,
    **options: Any,
) -> "Judge":
    """Load a DFJ judge from a local folder or a Hugging Face id; see `dfj.judge.load_judge`."""
    from dfj.judge import load_judge as _load

    return _load(source, runtime=runtime, device=device, dtype=dtype, mode=mode, **options)
