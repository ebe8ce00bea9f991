#!/usr/bin/env bash
# Build llama.cpp's reference tools (llama-tokenize, llama-bench, llama-completion; add
# llama-quantize for gguf_llamacpp_check.sh), and llama-logits (tools/reference/llama_logits.cpp,
# linked against the static libraries) from the
# llama.cpp source vendored in the `llama-cpp-python` sdist on PyPI. Used to produce the
# tokenizer reference ids (tools/reference/tokenizer_refs.sh) and as a speed baseline.
#
# Usage: tools/reference/build_llamacpp.sh BUILD_DIR
#   BUILD_DIR       where everything goes (sdist, unpacked source, cmake build); must lie outside
#                   the repository. Binaries end up in BUILD_DIR/build/bin/.
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  sdist version to use (default 0.3.36)
#   JOBS                      parallel build jobs (default 2)
#   CMAKE_EXTRA               more cmake options (word-split), e.g. "-DGGML_AMX_INT8=OFF"
#   TARGETS                   cmake targets (default "llama-tokenize llama-bench llama-completion";
#                             in this llama.cpp version the interactive `llama-cli` needs the server
#                             build, so the plain generator is `llama-completion`)
#
# Only CPU backends are built (GGML_NATIVE=ON, static libs, no tests/examples/server/network).
# AMX is compiled out (-mno-amx-*: GGML_NATIVE's -march=native would turn it on): on VMs whose
# CPU reports AMX but whose kernel does not grant the tile state (seen here), ggml's AMX kernels
# die of SIGILL at the first Q4 matmul.
# Takes roughly 15-30 minutes on 2 cores.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 BUILD_DIR" >&2
    exit 2
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
mkdir -p "$1"
build_root="$(cd "$1" && pwd -P)"
case "$build_root/" in
    "$repo_root"/*)
        echo "error: BUILD_DIR ($build_root) must be outside the repository ($repo_root)" >&2
        exit 2
        ;;
esac

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
jobs="${JOBS:-2}"
targets="${TARGETS:-llama-tokenize llama-bench llama-completion}"
sdist="$build_root/llama_cpp_python-$version.tar.gz"
src="$build_root/llama_cpp_python-$version/vendor/llama.cpp"

start=$(date +%s)

# cmake/ninja as PyPI wheels; scikit-build-core lets `pip download` prepare the sdist's metadata
# without an isolated build environment (which would compile cmake from source).
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    python3 -m pip install --quiet cmake ninja
fi
python3 -m pip install --quiet scikit-build-core

if [[ ! -f "$sdist" ]]; then
    python3 -m pip download --quiet --no-deps --no-build-isolation \
        --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$build_root"
fi
if [[ ! -d "$src" ]]; then
    tar -xzf "$sdist" -C "$build_root"
fi

cmake -S "$src" -B "$build_root/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF \
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    ${CMAKE_EXTRA:-}

# shellcheck disable=SC2086 # word splitting of the target list is intended
cmake --build "$build_root/build" --config Release -j "$jobs" --target $targets

# llama-logits: one C++ file against the static libraries just built (a second or two).
"${CXX:-c++}" -O2 -std=c++17 -I"$src/include" -I"$src/ggml/include" \
    "$repo_root/tools/reference/llama_logits.cpp" -o "$build_root/build/bin/llama-logits" \
    "$build_root/build/src/libllama.a" "$build_root/build/ggml/src/libggml.a" \
    "$build_root/build/ggml/src/libggml-cpu.a" "$build_root/build/ggml/src/libggml-base.a" \
    -fopenmp -lpthread -ldl -lm

end=$(date +%s)
echo "llama.cpp (llama-cpp-python $version) built in $((end - start)) s"
for t in $targets llama-logits; do
    ls -l "$build_root/build/bin/$t"
done
