"""What `dfj export` writes, typed: a lossless format and the options that format takes (importable
without torch). An option the format does not take, or a value outside its choices, is an error that
names it before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from dfj.images import PixelLimits

ExportFormat = Literal["none", "onnx-fp32", "gguf-f32", "gguf-f16"]
SavedDtype = Literal["auto", "float32", "bfloat16", "float16"]
MmprojDtype = Literal["f32", "f16"]
Mode = Literal["pointwise", "pairwise"]

# The options each format's exporter takes beyond mode and limits (which every format takes).
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": ("dtype", "check", "probe_memory"),
    "onnx-fp32": ("external_data",),
    "gguf-f32": ("mmproj_dtype", "probe_memory"),
    "gguf-f16": ("mmproj_dtype", "probe_memory"),
}
COMMON_OPTIONS = ("mode", "limits")


@dataclass(frozen=True)
class ExportSpec:
    """One export. Options left None take the exporter's default."""

    format: ExportFormat
    mode: Mode | None = None  # when the source does not say
    limits: PixelLimits | None = None  # the judge's image pixel limits (default: the source's)
    dtype: SavedDtype | None = None  # none: the merge's saved dtype (auto: the checkpoint's)
    check: bool | None = None  # none: probe the merge against base + adapter (default on)
    probe_memory: int | None = None  # none, gguf-*: weight bytes a parity probe may hold (0: stream all)
    mmproj_dtype: MmprojDtype | None = None  # gguf-*: the vision GGUF's precision
    external_data: bool | None = None  # onnx-fp32: weights in <graph>.onnx.data (default: graphs over 1.8 GB)

    def __post_init__(self) -> None:
        _choice("format", self.format, ExportFormat)
        _choice("mode", self.mode, Mode)
        _choice("dtype", self.dtype, SavedDtype)
        _choice("mmproj_dtype", self.mmproj_dtype, MmprojDtype)
        for name in ("check", "external_data"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.probe_memory is not None and (not isinstance(self.probe_memory, int) or self.probe_memory < 0):
            raise ValueError(f"probe_memory must be a number of bytes >= 0, not {self.probe_memory!r}")
        if self.limits is not None and not isinstance(self.limits, PixelLimits):
            raise ValueError(f"limits must be a dfj.images.PixelLimits, not {type(self.limits).__name__}")
        taken = (*COMMON_OPTIONS, *FORMAT_OPTIONS[self.format])
        misplaced = [f.name for f in fields(self) if f.name not in ("format", *taken) and getattr(self, f.name) is not None]
        if misplaced:
            elsewhere = {name: [fmt for fmt, names in FORMAT_OPTIONS.items() if name in names] for name in misplaced}
            raise ValueError("; ".join(f"{name} applies to --quant {' / '.join(where)}, not {self.format}"
                                       for name, where in elsewhere.items()))

    @classmethod
    def parse(cls, format: str, options: dict[str, Any]) -> "ExportSpec":
        """From keyword options (the library's `export(..., **options)`): an unknown name is an error that
        lists the names this format takes."""
        known = {f.name for f in fields(cls)} - {"format"}
        unknown = sorted(k for k in options if k not in known)
        if unknown:
            _choice("format", format, ExportFormat)
            taken = ", ".join((*COMMON_OPTIONS, *FORMAT_OPTIONS[format]))
            raise ValueError(f"unknown export option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(--quant {format} takes {taken})")
        return cls(format, **options)  # type: ignore[arg-type]

    def exporter_options(self) -> dict[str, Any]:
        """The options given, as the exporter's keyword arguments."""
        return {name: getattr(self, name) for name in (*COMMON_OPTIONS, *FORMAT_OPTIONS[self.format])
                if getattr(self, name) is not None}


def _choice(name: str, value: Any, kind: Any) -> None:
    choices = get_args(kind)
    if value is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
