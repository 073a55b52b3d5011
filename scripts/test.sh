#!/usr/bin/env bash
# Quick start, step 2: the same set-up, then the whole test suite: every ctest of the
# Release build, the embedding example against the installed package, and the parser and
# actor tests again under AddressSanitizer + UBSan.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

ctest --test-dir "$MOERT_BUILD" --output-on-failure -j "$(nproc)"
# ctest lists skipped tests (GPU tests without a GPU, fixture tests without fixtures) only as
# "Not Run": print each one's reason from its own output.
echo "moert: skipped tests and why"
awk '/^[0-9]+\/[0-9]+ Test: /{name=$3} /^SKIPPED: /{print "  " name ": " $0}' \
  "$MOERT_BUILD/Testing/Temporary/LastTest.log" 2>/dev/null || true

echo "moert: examples/embed_pipeline against the installed package"
prefix="$MOERT_ROOT/build-examples/moert-prefix"  # scratch prefix, refilled each run
rm -rf "$prefix"
cmake --install "$MOERT_BUILD" --prefix "$prefix" >/dev/null
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$MOERT_ROOT/examples/embed_pipeline" -B "$MOERT_ROOT/build-examples/embed_pipeline" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" "${launcher[@]}" >/dev/null
cmake --build "$MOERT_ROOT/build-examples/embed_pipeline"
"$MOERT_ROOT/build-examples/embed_pipeline/embed_pipeline"

echo "moert: examples/multi_node (three node processes on loopback vs one process)"
MOERT_BUILD="$MOERT_BUILD" "$MOERT_ROOT/examples/multi_node/run.sh"

echo "moert: examples/fault_injection (moert eval under a fault plan vs without)"
MOERT_BUILD="$MOERT_BUILD" "$MOERT_ROOT/examples/fault_injection/run.sh"

echo "moert: parser and actor tests under ASan + UBSan"
moert_build "$MOERT_ROOT/build-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOERT_SANITIZE=ON \
  -DMOERT_BUILD_BENCH=OFF -DMOERT_WITH_CUDA=OFF -- moert_asan_tests
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir "$MOERT_ROOT/build-asan" -L asan --output-on-failure -j "$(nproc)"
