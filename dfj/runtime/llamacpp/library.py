"""llama-cpp-python, loaded once per process: its C-level logging silenced (it prints every tensor it
loads), its backend initialised, and llama.cpp's CPU backend chosen for this CPU.

dfj's wheel carries llama.cpp's CPU backend as one loadable library per instruction-set level
(`libggml-cpu-<level>.so`, scripts/install.sh), as llama.cpp's own releases do. Each library scores
the running CPU (0: it cannot run here); the best one is loaded before any model, once per process
(llama-cpp-python never loads them itself). A CPU can announce what it cannot run (a VM, a kernel
without the state, a kernel bug), so a level is first tried on the model it will run, in a child
process, once per machine, level and model file: one that dies there is passed over for the next
level down, and the outcome is kept in `$DFJ_CACHE/llama-cpu-levels.json`.

`DFJ_LLAMA_CPU=<level>` forces one level, untried (a lower one stands in for an older CPU; one this
CPU cannot run is refused); `DFJ_LLAMA_AMX=1` lets the AMX level be chosen (see `AMX_LEVELS`). A wheel
built with the CPU backend linked in reports the level `built-in`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FORCE_ENV = "DFJ_LLAMA_CPU"
AMX_ENV = "DFJ_LLAMA_AMX"
# Levels whose quantized weights llama.cpp repacks into AMX tiles. On this project's AMX Xeon that path
# dies with SIGILL (`tilezero` on an OpenMP worker with no tile configuration loaded: docs/formats.md,
# "llama.cpp's CPU levels"), so the levels below it are used unless DFJ_LLAMA_AMX=1 (tried first, as
# every level is).
AMX_LEVELS = ("sapphirerapids",)
CHECK_ENV = "DFJ_LLAMA_CPU_CHECK"  # "0": load the best-scoring level untried (the child of a check)
CHECK_TIMEOUT_S = 300

_LOG_SINK = None
_CPU: "CpuBackend | None" = None


@dataclass(frozen=True)
class CpuBackend:
    """The llama.cpp CPU backend this process runs on."""

    level: str  # the instruction-set level (haswell, skylakex, zen4, …), or "built-in"
    path: str | None  # its library
    chosen_by: str  # "score" (the best this CPU runs), "DFJ_LLAMA_CPU", or "built-in"; and what was passed over
    scores: dict[str, int] = field(default_factory=dict)  # every level's score on this CPU (0: cannot run)
    features: dict[str, str] = field(default_factory=dict)  # what the loaded library says it uses

    def describe(self) -> dict:
        used = sorted(name for name, value in self.features.items() if value == "1")
        return {"llama_cpu_level": self.level, "llama_cpu_chosen_by": self.chosen_by, "llama_cpu_features": used}


def quiet_llama(model: Path | None = None):
    """The `llama_cpp` module, ready: logging of llama.cpp and mtmd silenced, the backend initialised and
    the CPU backend loaded (`cpu_backend(model)`)."""
    global _LOG_SINK
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p())
        mtmd_cpp.mtmd_log_set(_LOG_SINK, ctypes.c_void_p())
        mtmd_cpp.mtmd_helper_log_set(_LOG_SINK, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
    cpu_backend(model)
    return llama_cpp


def levels(lib: Path | None = None) -> dict[str, Path]:
    """The CPU levels the installed wheel carries: {level: library}."""
    lib = lib or _lib_dir()
    return {path.name.removeprefix("libggml-cpu-").removesuffix(".so"): path for path in sorted(lib.glob("libggml-cpu-*.so"))}


def cpu_backend(model: Path | None = None) -> CpuBackend:
    """Load llama.cpp's CPU backend for this process (once) and say which. With `model` (the first GGUF
    the process runs), a level not yet seen to run it on this machine is tried on it first."""
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
        allowed = sorted((level for level, score in scores.items()
                          if score and (level not in AMX_LEVELS or os.environ.get(AMX_ENV) == "1")), key=scores.get, reverse=True)
        if not allowed:
            raise RuntimeError(f"no llama.cpp CPU level of {', '.join(available)} runs on this CPU")
        level, chosen_by, failed = allowed[0], "score", []
        if model is not None and os.environ.get(CHECK_ENV) != "0":
            for level in allowed:
                outcome = _tried(level, Path(model))
                if outcome is None:
                    break
                failed.append(f"{level} failed on this CPU ({outcome})")
            else:
                raise RuntimeError(f"no llama.cpp CPU level runs {model} on this CPU: {'; '.join(failed)}")
        chosen_by = "; ".join([chosen_by, *failed])
    _CPU = CpuBackend(level, str(available[level]), chosen_by, scores, _load(available[level]))
    return _CPU


# -- a level tried on the model in a child process, once per machine, level and model ---------------------
TRY = """
import sys
from pathlib import Path
from dfj.runtime.llamacpp.library import quiet_llama
llama_cpp = quiet_llama()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
assert model, "the model did not load"
params = llama_cpp.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_ubatch, params.no_perf = 64, 16, 16, True
ctx = llama_cpp.llama_init_from_model(model, params)
tokens = (llama_cpp.llama_token * 8)(*range(1, 9))
assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 8)) == 0, "decode failed"
print("ok")
"""


def _tried(level: str, model: Path) -> str | None:
    """None where `level` runs a forward pass of `model` on this machine, else how it failed."""
    record = _levels_file()
    key = hashlib.sha256(json.dumps([_machine(), level, _model_identity(model)]).encode()).hexdigest()
    try:
        known = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        env = {**os.environ, FORCE_ENV: level, CHECK_ENV: "0"}
        try:
            done = subprocess.run([sys.executable, "-c", TRY, str(model)], env=env, capture_output=True, text=True,
                                  timeout=CHECK_TIMEOUT_S)
            outcome = None if done.returncode == 0 and done.stdout.strip().endswith("ok") else _status(done.returncode)
        except subprocess.TimeoutExpired:
            outcome = f"no answer in {CHECK_TIMEOUT_S} s"
        known[key] = {"level": level, "model": str(model), "failed": outcome}
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, record)
    return known[key]["failed"]


def _status(returncode: int) -> str:
    if returncode < 0:
        import signal

        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def _levels_file() -> Path:
    return Path(os.environ.get("DFJ_CACHE") or Path.home() / ".cache" / "dfj") / "llama-cpu-levels.json"


def _machine() -> str:
    """This machine's CPU as a level check sees it: its flags and llama.cpp's build."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    from dfj.version import package_version

    return hashlib.sha256(f"{flags}|{package_version('llama_cpp_python')}".encode()).hexdigest()


def _model_identity(model: Path) -> str:
    """The model file as its artifact's dfj.json pins it, else its size and time."""
    try:
        files = json.loads((model.parent / "dfj.json").read_text(encoding="utf-8"))["files"]
        return files[model.name]
    except (OSError, ValueError, KeyError, TypeError):
        stat = model.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"


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


def _ggml_of_libllama() -> ctypes.CDLL:
    """The libggml that libllama is linked to. llama_cpp._ggml opens `libggml.so` by path, which the
    dynamic loader maps as a second copy with a registry of its own: a backend loaded there is one
    libllama never sees. Asked by soname and with RTLD_NOLOAD, the loader returns libllama's own."""
    for path in sorted(_lib_dir().glob("libggml.so.*"), key=lambda p: len(p.name)):
        try:
            return ctypes.CDLL(path.name, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    raise RuntimeError(f"libllama's libggml is not loaded (looked for libggml.so.* of {_lib_dir()})")


def _load(path: Path) -> dict[str, str]:
    """Register the level's backend with ggml (before any model loads); the features it reports."""
    libggml = _ggml_of_libllama()
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
