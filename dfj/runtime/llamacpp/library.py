"""llama-cpp-python, loaded once per process: its C-level logging silenced (it prints every tensor it
loads), its backend initialised, and llama.cpp's CPU backend chosen for this CPU.

dfj's wheel carries llama.cpp's CPU backend as one loadable library per instruction-set level
(`libggml-cpu-<level>.so`, scripts/llama-cpu-variants.cmake), as llama.cpp's own releases do. Each
library scores the running CPU (0: it cannot run here); the best one is loaded before any model, once
per process. llama-cpp-python never loads them itself. `DFJ_LLAMA_CPU=<level>` forces one level (a
lower one stands in for an older CPU; one the CPU cannot run is refused), `DFJ_LLAMA_AMX=1` lets the
AMX level be chosen (see `AMX_LEVELS`). A wheel built the old way, with the CPU backend linked in,
reports the level `built-in`.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

FORCE_ENV = "DFJ_LLAMA_CPU"
AMX_ENV = "DFJ_LLAMA_AMX"
# Levels whose weights llama.cpp repacks into its AMX tiles. Measured on an AMX Xeon with dfj's GGUF
# judges, that path crashed (docs/formats.md, "llama.cpp's CPU levels"): the level below it is used
# unless DFJ_LLAMA_AMX=1.
AMX_LEVELS = ("sapphirerapids",)

_LOG_SINK = None
_CPU: "CpuBackend | None" = None


@dataclass(frozen=True)
class CpuBackend:
    """The llama.cpp CPU backend this process runs on."""

    level: str  # the instruction-set level (haswell, skylakex, zen4, …), or "built-in"
    path: str | None  # its library
    chosen_by: str  # "score" (the best this CPU runs), "DFJ_LLAMA_CPU", or "built-in"
    scores: dict[str, int] = field(default_factory=dict)  # every level's score on this CPU (0: cannot run)
    features: dict[str, str] = field(default_factory=dict)  # what the loaded library says it uses

    def describe(self) -> dict:
        used = sorted(name for name, value in self.features.items() if value == "1")
        return {"llama_cpu_level": self.level, "llama_cpu_chosen_by": self.chosen_by, "llama_cpu_features": used}


def quiet_llama():
    """The `llama_cpp` module, ready: logging of llama.cpp and mtmd silenced, the backend initialised and
    the CPU backend loaded (`cpu_backend()`)."""
    global _LOG_SINK
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p())
        mtmd_cpp.mtmd_log_set(_LOG_SINK, ctypes.c_void_p())
        mtmd_cpp.mtmd_helper_log_set(_LOG_SINK, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
    cpu_backend()
    return llama_cpp


def levels(lib: Path | None = None) -> dict[str, Path]:
    """The CPU levels the installed wheel carries: {level: library}."""
    lib = lib or _lib_dir()
    return {path.name.removeprefix("libggml-cpu-").removesuffix(".so"): path for path in sorted(lib.glob("libggml-cpu-*.so"))}


def cpu_backend() -> CpuBackend:
    """Load llama.cpp's CPU backend for this process (once) and say which."""
    global _CPU
    if _CPU is not None:
        return _CPU
    available = levels()
    if not available:
        _CPU = CpuBackend("built-in", None, "built-in")
        return _CPU
    scores = {level: _score(path) for level, path in available.items()}
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced and forced != "auto":
        if forced not in available:
            raise RuntimeError(f"{FORCE_ENV}={forced}: this llama.cpp carries the CPU levels {', '.join(available)}")
        if scores[forced] == 0:
            raise RuntimeError(f"{FORCE_ENV}={forced}: this CPU cannot run that level (it can: "
                               f"{', '.join(level for level, score in scores.items() if score)})")
        level, chosen_by = forced, FORCE_ENV
    else:
        allowed = {level: score for level, score in scores.items()
                   if score and (level not in AMX_LEVELS or os.environ.get(AMX_ENV) == "1")}
        if not allowed:
            raise RuntimeError(f"no llama.cpp CPU level of {', '.join(available)} runs on this CPU")
        level, chosen_by = max(allowed.items(), key=lambda item: item[1])[0], "score"
    _CPU = CpuBackend(level, str(available[level]), chosen_by, scores, _load(available[level]))
    return _CPU


def _lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _score(path: Path) -> int:
    """The level's own verdict on this CPU (llama.cpp's `ggml_backend_score`: 0 where it cannot run)."""
    library = ctypes.CDLL(str(path))
    score = library.ggml_backend_score
    score.restype = ctypes.c_int
    return int(score())


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def _load(path: Path) -> dict[str, str]:
    """Register the level's backend with ggml (before any model loads); the features it reports."""
    from llama_cpp._ggml import libggml

    libggml.ggml_backend_load.restype = ctypes.c_void_p
    libggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    registry = libggml.ggml_backend_load(str(path).encode())
    if not registry:
        raise RuntimeError(f"llama.cpp could not load its CPU backend {path}")
    libggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    libggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    address = libggml.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_get_features")
    if not address:
        return {}
    get_features = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(address)
    features, pointer = {}, get_features(registry)
    for index in range(256):
        if not pointer[index].name:
            break
        features[pointer[index].name.decode()] = pointer[index].value.decode()
    return features
