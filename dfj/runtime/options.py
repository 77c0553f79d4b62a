"""What `dfj.load_judge(..., **options)` may pass to each runtime, typed (importable without torch).

An option a runtime does not take is an error that names it and lists the ones it takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping, TypeVar, get_args

from dfj.images import PixelLimits

# The llama.cpp runtime's image encoders (dfj.runtime.llamacpp.torch_vision).
VisionEncoder = Literal["mtmd", "torch", "torch-bf16"]

# Parts of a float32 judge the torch runtime may run in bfloat16 on a CPU that multiplies bf16 natively.
Bf16Part = Literal["vision", "head"]

# The Unicode normalisation llama.cpp's tokenizer lacks and the runtime applies: "manifest" reads the
# source tokenizer's from the artifact (Qwen2.5: NFC); None applies none.
Normalizer = Literal["manifest", "NFC", "NFKC", "NFD", "NFKD"]

T = TypeVar("T", bound="RuntimeOptions")


@dataclass(frozen=True)
class RuntimeOptions:
    """Every runtime's options: the image pixel limits (default: as the artifact's manifest records)."""

    limits: PixelLimits | None = None

    def __post_init__(self) -> None:
        if self.limits is not None and not isinstance(self.limits, PixelLimits):
            raise ValueError(f"limits must be a dfj.images.PixelLimits, not {type(self.limits).__name__}")

    @classmethod
    def parse(cls: type[T], runtime: str, given: Mapping[str, Any]) -> T:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"unknown {runtime} runtime options: {', '.join(unknown)} (it takes {', '.join(names)})")
        return cls(**given)


@dataclass(frozen=True)
class TorchOptions(RuntimeOptions):
    # Linear weights reordered once into oneDNN's layout (`dfj.runtime.torch_packed`): None packs a
    # merged float32/bfloat16 judge on CPU and leaves anything else as loaded; True insists (an error
    # where it cannot); False keeps plain `torch.nn.Linear` (transformers exactly as loaded).
    pack_weights: bool | None = None
    # Parts run in bfloat16 (lossy; docs/formats.md "bf16 parts"): "vision" (the vision tower and
    # merger) and "head" (the output projection). Only on a CPU with native bf16 products (AMX or
    # AVX512_BF16), for a float32 judge; the default, (), is lossless.
    bf16: tuple[Bf16Part, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pack_weights is not None and not isinstance(self.pack_weights, bool):
            raise ValueError(f"pack_weights must be True, False or None, not {self.pack_weights!r}")
        if isinstance(self.bf16, str) or not all(part in get_args(Bf16Part) for part in self.bf16):
            raise ValueError(f"bf16 takes parts {', '.join(get_args(Bf16Part))} (a tuple), not {self.bf16!r}")


@dataclass(frozen=True)
class LlamaCppOptions(RuntimeOptions):
    context: int | None = None  # KV positions (default: the runtime's DEFAULT_CONTEXT)
    threads: int | None = None  # CPU threads (default: llama.cpp's)
    normalizer: Normalizer | None = "manifest"
    # The image encoder: llama.cpp's mtmd, or the mmproj's weights in transformers' tower (float32, or
    # bfloat16 on a CPU with native bf16 products; dfj.runtime.llamacpp.torch_vision): faster on images.
    vision: VisionEncoder = "mtmd"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision not in get_args(VisionEncoder):
            raise ValueError(f"vision must be one of {', '.join(get_args(VisionEncoder))}, not {self.vision!r}")
        for name in ("context", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.normalizer is not None and self.normalizer not in get_args(Normalizer):
            raise ValueError(f"normalizer must be one of {', '.join(get_args(Normalizer))} or None, not {self.normalizer!r}")
