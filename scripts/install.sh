#!/usr/bin/env bash
# Set up ./.venv with dfj and everything it needs. Idempotent: a second run with an unchanged
# pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# llama-cpp-python is source-only on PyPI, and its default build targets the build machine's CPU (a
# wheel that may die with SIGILL on another). dfj builds it once as llama.cpp's own releases are built:
# the CPU backend as one loadable library per instruction-set level, SSE2 to AVX-512 and AMX
# (GGML_BACKEND_DL, GGML_CPU_ALL_VARIANTS), installed beside libllama (CMAKE_INSTALL_BINDIR); dfj's
# llama.cpp runtime loads the best one the running CPU supports. The wheel is kept in the wheel cache
# (never pip's own cache, which may hold a native build), under a folder named after the build's
# settings, and every later install takes it from there.
LLAMA_CPP_VERSION=0.3.36
WHEELS=${DFJ_WHEEL_CACHE:-$HOME/.cache/dfj/wheels}
LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
build=$(echo "$LLAMA_CPP_VERSION $LLAMA_CMAKE" | sha256sum | cut -c1-12)
LLAMA_WHEELS=$WHEELS/cpu-levels-$build
stamp=.venv/.dfj-install-stamp
want=$( (sha256sum pyproject.toml scripts/install.sh; echo "llama.cpp build: $build") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import dfj, torch, transformers" 2>/dev/null; then
    echo "dfj: .venv is up to date"
    exit 0
fi
mkdir -p "$LLAMA_WHEELS"
# The source package is kept too: its llama.cpp converter (convert_hf_to_gguf.py) is what the tests
# check dfj's GGUF export against.
LLAMA_SDIST=$WHEELS/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
if [ ! -f "$LLAMA_SDIST" ]; then
    echo "dfj: fetching the llama-cpp-python $LLAMA_CPP_VERSION source package (once)"
    if ! .venv/bin/python -m pip download --disable-pip-version-check --no-cache-dir --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$WHEELS" > .venv/llama-download.log 2>&1; then
        tail -20 .venv/llama-download.log
        echo "dfj: llama-cpp-python download failed (full log: .venv/llama-download.log)" >&2
        exit 1
    fi
fi
if ! ls "$LLAMA_WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl > /dev/null 2>&1; then
    echo "dfj: building llama-cpp-python $LLAMA_CPP_VERSION with one CPU backend per instruction-set level (once; about 15 minutes on 2 cores)"
    if ! CMAKE_ARGS="$LLAMA_CMAKE" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        .venv/bin/python -m pip wheel --disable-pip-version-check --no-cache-dir --no-deps \
        "$LLAMA_SDIST" -w "$LLAMA_WHEELS" > .venv/llama-build.log 2>&1; then
        tail -40 .venv/llama-build.log
        echo "dfj: llama-cpp-python build failed (full log: .venv/llama-build.log)" >&2
        exit 1
    fi
fi
# torch 2.14.1 + torchvision 0.29.1: transformers 5 needs a working torchvision for the Qwen2.5-VL
# processor, and this pair is the one that installs together here (see README, "Versions").
# The second pip call puts this build in place when the venv held the other one (same version).
if ! { .venv/bin/python -m pip install --disable-pip-version-check --find-links "$LLAMA_WHEELS" -e '.[all]' &&
       .venv/bin/python -m pip install --disable-pip-version-check --no-deps --force-reinstall --no-index \
           --find-links "$LLAMA_WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"; } > .venv/install.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/install.log | tail -40
    echo "dfj: install failed (full log: .venv/install.log)" >&2
    exit 1
fi
.venv/bin/python -c "import dfj, torch, torchvision, transformers, peft, gguf, llama_cpp"
echo "$want" > "$stamp"
echo "dfj: .venv ready"
