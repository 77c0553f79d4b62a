#!/usr/bin/env bash
# Build llama.cpp's own programs (llama-server, llama-mtmd-cli) from the llama.cpp that the pinned
# llama-cpp-python source package vendors, so a dfj GGUF artifact can be checked in the stock tools a
# C/C++ user or any language (through llama-server) would embed. Not part of the normal install.
#
# The CPU kernels are not compiled again: the build has no CPU backend (GGML_BACKEND_DL, GGML_CPU=OFF)
# and the programs load one of the per-level CPU libraries of dfj's llama-cpp-python wheel, named by
# GGML_BACKEND_PATH (dfj's runtime picks the level; `python -m dfj.runtime.llamacpp.library` prints it).
# Kept in $DFJ_CACHE/llama-tools-<build>/bin, staged and renamed into place; a second run returns at once.
#
#   scripts/build-llama-tools.sh            # about 5 minutes on 2 cores, once; prints the folder
#   scripts/build-llama-tools.sh --where    # prints the folder if it is built, else exits 1
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_VERSION=0.3.36  # scripts/install.sh's
WHEELS=${DFJ_WHEEL_CACHE:-$HOME/.cache/dfj/wheels}
CACHE=${DFJ_CACHE:-$HOME/.cache/dfj}
SDIST=$WHEELS/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
# llama-server downloads nothing (no curl, no OpenSSL, no web UI) and nothing is built natively.
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH='$ORIGIN'
    -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU=OFF
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_HTML=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
)
build=$(echo "$LLAMA_CPP_VERSION ${CMAKE_FLAGS[*]}" | sha256sum | cut -c1-12)
OUT=$CACHE/llama-tools-$build
if [ -x "$OUT/bin/llama-server" ] && [ -x "$OUT/bin/llama-mtmd-cli" ]; then
    echo "$OUT"
    exit 0
fi
if [ "${1:-}" = "--where" ]; then
    exit 1
fi
if [ ! -f "$SDIST" ]; then
    echo "dfj: $SDIST is missing: run scripts/install.sh first" >&2
    exit 1
fi
command -v cmake > /dev/null || { echo "dfj: cmake is needed (pip install cmake, or the system's)" >&2; exit 1; }
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.llama-tools-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xzf "$SDIST" -C "$work" "llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
src=$work/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp
echo "dfj: building llama-server and llama-mtmd-cli from llama.cpp in llama-cpp-python $LLAMA_CPP_VERSION (log: $work/build.log)" >&2
if ! { cmake -S "$src" -B "$work/build" "${CMAKE_FLAGS[@]}" &&
       cmake --build "$work/build" -j "$(nproc)" --target llama-server llama-mtmd-cli; } > "$work/build.log" 2>&1; then
    tail -40 "$work/build.log" >&2
    echo "dfj: llama.cpp tools build failed" >&2
    exit 1
fi
mkdir -p "$work/stage/bin"
cp -a "$work/build/bin/." "$work/stage/bin/"
cp "$work/build.log" "$work/stage/build.log"
echo "$LLAMA_CPP_VERSION ${CMAKE_FLAGS[*]}" > "$work/stage/BUILD"
rm -rf "$OUT"
mv "$work/stage" "$OUT"
echo "$OUT"
