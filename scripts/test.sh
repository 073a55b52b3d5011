#!/usr/bin/env bash
# Quick start, step 2: the same set-up, then the whole test suite: every ctest of the
# Release build, and the parser tests again under AddressSanitizer + UBSan.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

ctest --test-dir "$MOERT_BUILD" --output-on-failure -j "$(nproc)"

echo "moert: parser tests under ASan + UBSan"
moert_build "$MOERT_ROOT/build-asan" -DCMAKE_BUILD_TYPE=Debug -DMOERT_SANITIZE=ON \
  -DMOERT_BUILD_BENCH=OFF -DMOERT_WITH_CUDA=OFF -- model_config_test model_safetensors_test
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir "$MOERT_ROOT/build-asan" -L parser --output-on-failure
