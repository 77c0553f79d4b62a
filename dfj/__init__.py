"""dfj: export, quantize, run and verify DeepfakeJudge judges.

`import dfj` stays light (no torch, no transformers): heavy libraries are imported by the runtime
or exporter that needs them, when it is used.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# torchao (pulled in by GPTQModel, imported by transformers) registers enums with torch's pytree, and
# torch warns about each one on every model load: noise for a user, nothing to act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from dfj.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from dfj.judge import load_judge

__all__ = ["__version__", "load_judge"]


def __getattr__(name: str) -> Any:
    # `dfj.load_judge` resolves on first use, so `import dfj` pulls in no heavy library.
    if name == "load_judge":
        from dfj.judge import load_judge

        return load_judge
    raise AttributeError(f"module 'dfj' has no attribute {name!r}")
