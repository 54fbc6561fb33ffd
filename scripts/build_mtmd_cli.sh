#!/usr/bin/env bash
# Build llama.cpp's own llama-mtmd-cli and llama-server from the very sources the installed
# llama-cpp-python was built from (its sdist carries them in vendor/llama.cpp), with the same
# CMake defaults (shared libraries, native CPU flags, no curl), for side-by-side benchmarks.
#
#   scripts/build_mtmd_cli.sh [OUT_DIR]      (default build/llama.cpp; prints the binaries' paths)
#   CMAKE_ARGS="-DGGML_CUDA=on" scripts/build_mtmd_cli.sh    for a CUDA build
set -euo pipefail
out=$(realpath -m "${1:-build/llama.cpp}")
version=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
mkdir -p "$out"
src="$out/llama_cpp_python-$version/vendor/llama.cpp"
if [ ! -d "$src" ]; then
  sdist="$out/llama_cpp_python-$version.tar.gz"
  [ -f "$sdist" ] || python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out"
  tar -xzf "$sdist" -C "$out"
fi
# shellcheck disable=SC2086
cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON ${CMAKE_ARGS:-} >&2
cmake --build "$out/build" --target llama-mtmd-cli llama-server -j "$(nproc)" >&2
echo "$out/build/bin/llama-mtmd-cli"
echo "$out/build/bin/llama-server"
