#!/usr/bin/env bash
# The GPU-machine check of issue [F], in one command. Runs ON a lent GPU machine (CUDA 13,
# cuBLAS, NCCL, CMake, ninja, a C++ compiler, PyTorch + transformers; none of our Debian
# packages, no network), from the repository root, with .debs/ and .gpu-carry/ carried
# (scripts/gpu/fetch_debs.sh makes both here). Every log goes to $OUT (the device tool's
# folder that comes back, at most 8 files: summary.txt, logs.tgz with every step's log, and
# the calibrated testbed; default ./gpu-check-out).
#
#   steps: unpack every .deb into a prefix (dpkg -x), configure against it with CUDA (arch 90),
#   build with all cores, run the GPU tests (ctest -L gpu: every operation against cpu, the
#   fixtures on CUDA through the reference forward (f32 1e-3, bf16 2e-2) and through the engine's
#   actor path with one attention + one expert GPU stream in one process (the cpu backend's
#   greedy tokens)), the nccl cluster (1 cuda attention + 1 cuda expert `moert node` process,
#   rows by NCCL: the cpu greedy tokens; tests/cluster/cuda_nccl), bench/cuda_bench,
#   `moert calibrate --backend cuda`, and decode tokens/s of the bench checkpoint: moert
#   --backend cuda against PyTorch eager transformers (bench/torch_decode.py) on the same
#   checkpoint.
#
# On the CPU machine (no GPU), to prove the unpack + configure + build steps before a GPU
# session: MOERT_GPU_CHECK_CPU_ONLY=1 scripts/gpu/check.sh   (stops after the build; the
# prefix is /tmp/moert-gpu-prefix unless MOERT_GPU_PREFIX says otherwise; MOERT_GPU_TARGETS
# limits what is built, MOERT_GPU_JOBS the jobs, MOERT_GPU_BUILD_TIMEOUT the build step's limit
# in seconds, 900 by default: a cold build on 2 loaded cores needs more).
#
# Device-tool calls (15 min of device time in all, the machine's start included): two, the
# second right after the first while the machine is warm (it then reuses the build):
#   run(command="MOERT_GPU_STEPS=tests,bench scripts/gpu/check.sh", carry=[".debs", ".gpu-carry"], timeout_s=420)
#   run(command="MOERT_GPU_STEPS=decode scripts/gpu/check.sh", carry=[".debs", ".gpu-carry"], timeout_s=300)
# Not yet run on any GPU: the timings are guesses, which is why every step has its own limit and
# the logs are packed after each one.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
CPU_ONLY="${MOERT_GPU_CHECK_CPU_ONLY:-0}"
PREFIX="${MOERT_GPU_PREFIX:-/tmp/moert-gpu-prefix}"
BUILD="${MOERT_GPU_BUILD:-$ROOT/build-gpu}"
JOBS="${MOERT_GPU_JOBS:-$(nproc)}"
DEBS="$ROOT/.debs"
CARRY="$ROOT/.gpu-carry"
LOGS="${MOERT_GPU_LOGS:-/tmp/moert-gpu-logs}"
rm -rf "$LOGS" && mkdir -p "$LOGS"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)

note() { echo "[check $(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }
# The logs travel as one archive, refreshed after every step so that a run stopped at its
# limit still brings back what it did.
pack() { cp "$SUMMARY" "$LOGS/" 2>/dev/null; tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; }
# step NAME TIMEOUT_S CMD...: runs CMD with its output in $LOGS/NAME.log, notes the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  note "$name: exit $rc in $(( $(date +%s) - t )) s (log $name.log)"
  pack
  return $rc
}
trap pack EXIT

note "host: $(uname -n), $(nproc) cores; $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; command -v nvcc && nvcc --version; cmake --version; g++ --version; } \
  >"$LOGS/environment.log" 2>&1

# -- 1. the Debian packages into a prefix ---------------------------------------------------
ls "$DEBS"/*.deb >/dev/null 2>&1 || { note "no $DEBS/*.deb: run scripts/gpu/fetch_debs.sh on the CPU machine and carry .debs"; exit 2; }
ARCH_LIB="$PREFIX/usr/lib/x86_64-linux-gnu"
if [[ ! -f $PREFIX/.unpacked ]]; then  # a warm machine keeps /tmp: a second run reuses it
rm -rf "$PREFIX" && mkdir -p "$PREFIX"
for f in "$DEBS"/*.deb; do dpkg -x "$f" "$PREFIX" || { note "dpkg -x $f failed"; exit 2; }; done
# Debian's configs and links assume the files live in /usr: point them into the prefix.
# - UCX's targets file and OpenBLAS's config hard-code /usr.
sed -i "s|set(prefix \"/usr\")|set(prefix \"$PREFIX/usr\")|" "$ARCH_LIB/cmake/ucx/ucx-targets.cmake"
sed -i "s| /usr/| $PREFIX/usr/|g" "$ARCH_LIB/openblas-pthread/cmake/openblas/OpenBLASConfig.cmake"
# - OpenBLAS's config and libopenblas.so.0 normally come through update-alternatives (not run
#   by dpkg -x): the pthread variant is the one Debian selects by default.
mkdir -p "$ARCH_LIB/cmake/openblas"  # the package ships this folder empty
for f in "$ARCH_LIB"/openblas-pthread/cmake/openblas/*.cmake; do ln -sf "$f" "$ARCH_LIB/cmake/openblas/"; done
ln -sf openblas-pthread/libopenblas.so.0 "$ARCH_LIB/libopenblas.so.0"
ln -sf openblas-pthread/libopenblas.so "$ARCH_LIB/libopenblas.so"
# - absolute symlinks (libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13): into the prefix when
#   the target is there, else to this machine's own library of that name.
while IFS= read -r link; do
  target=$(readlink "$link")
  if [[ -e $PREFIX$target ]]; then
    ln -sfn "$PREFIX$target" "$link"
  elif [[ ! -e $target && $(basename "$link") == lib*.so ]]; then
    own=$(ls /usr/lib/x86_64-linux-gnu/"$(basename "$link")".* /lib/x86_64-linux-gnu/"$(basename "$link")".* 2>/dev/null | head -n 1)
    [[ -n $own ]] && ln -sfn "$own" "$link"
  fi
done < <(find "$PREFIX" -type l -lname '/*')
touch "$PREFIX/.unpacked"
note "unpacked $(ls "$DEBS"/*.deb | wc -l) packages into $PREFIX"
fi

# Headers and libraries of the prefix for every compile and link (CPATH and LIBRARY_PATH are
# searched after -I/-L, before the system's own directories), DT_RPATH (not RUNPATH: it also
# serves the libraries' own dependencies, libucs -> libnuma) so the binaries find the prefix
# at run time without LD_LIBRARY_PATH, which would also reach this machine's Python.
export CPATH="$PREFIX/usr/include:$PREFIX/usr/include/x86_64-linux-gnu${CPATH:+:$CPATH}"
export LIBRARY_PATH="$ARCH_LIB:$ARCH_LIB/openblas-pthread${LIBRARY_PATH:+:$LIBRARY_PATH}"
export PKG_CONFIG_LIBDIR="$ARCH_LIB/pkgconfig:$PREFIX/usr/share/pkgconfig"
export PKG_CONFIG_SYSROOT_DIR="$PREFIX"
RPATH_FLAGS="-Wl,--disable-new-dtags -Wl,-rpath,$ARCH_LIB:$ARCH_LIB/openblas-pthread -Wl,-rpath-link,$ARCH_LIB:$ARCH_LIB/openblas-pthread"
PKG_CONFIG=$(command -v pkg-config || true)
if [[ -z $PKG_CONFIG ]]; then
  # Debian's pkgconf from the prefix, with its library beside it.
  PKG_CONFIG="$PREFIX/pkg-config-wrapper"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$ARCH_LIB" "$PREFIX/usr/bin/pkgconf" >"$PKG_CONFIG"
  chmod +x "$PKG_CONFIG"
fi

# -- 2. configure and build -----------------------------------------------------------------
FIXTURES="$CARRY/fixtures"
[[ -d $FIXTURES ]] || FIXTURES="$ROOT/../shared/fixtures"
# Not removed first: on a warm machine a second run rebuilds nothing.
step configure 300 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOERT_BUILD_BENCH=ON \
  -DMOERT_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$PREFIX/usr" \
  -DPKG_CONFIG_EXECUTABLE="$PKG_CONFIG" -DMOERT_FIXTURES_DIR="$FIXTURES" \
  -DCMAKE_EXE_LINKER_FLAGS="$RPATH_FLAGS" -DCMAKE_SHARED_LINKER_FLAGS="$RPATH_FLAGS" || { note "configure failed"; exit 3; }
# Where each dependency was found (they must be the prefix's, except CUDA's).
grep -E "^(CAF_INCLUDE_DIR|CAF_core_LIBRARY|ucx_DIR|spdlog_DIR|fmt_DIR|CLI11_DIR|nlohmann_json_DIR|Catch2_DIR|OpenBLAS_DIR|OPENSSL_INCLUDE_DIR|NCCL_LIBRARY|CUDAToolkit_BIN_DIR|CMAKE_CUDA_COMPILER)[:=]" \
  "$BUILD/CMakeCache.txt" | tee "$LOGS/found.log" >>"$SUMMARY"
# Only what the check runs (a whole build would spend minutes of the lease on the server,
# tokenizer and cluster tests): moert, the CUDA bench, every gpu-labelled test binary and the
# control tests below. MOERT_GPU_TARGETS overrides ("all": everything).
TARGETS=()
if [[ -n ${MOERT_GPU_TARGETS:-} ]]; then
  [[ $MOERT_GPU_TARGETS == all ]] || read -r -a TARGETS <<<"$MOERT_GPU_TARGETS"
else
  TARGETS=(moert cli_moert_test model_fixtures_test engine_engine_test gpu_cpu_gemm_test gpu_cpu_ops_test)
  grep -q "moert_bench_cuda" "$BUILD/build.ninja" && TARGETS+=(moert_bench_cuda)
  # moert_add_test names a test's binary <test name>_test.
  while read -r name; do TARGETS+=("${name}_test"); done < <(
    ctest --test-dir "$BUILD" -N -L gpu --show-only=json-v1 2>/dev/null |
      "${PYTHON:-python3}" -c 'import json,sys; [print(t["name"]) for t in json.load(sys.stdin)["tests"]]' 2>/dev/null)
fi
note "build targets: ${TARGETS[*]:-all}"
step build "${MOERT_GPU_BUILD_TIMEOUT:-900}" cmake --build "$BUILD" -j "$JOBS" ${TARGETS:+--target "${TARGETS[@]}"} || { note "build failed"; tail -n 40 "$LOGS/build.log" >>"$SUMMARY"; exit 4; }
MOERT="$BUILD/cli/moert"
if [[ $CPU_ONLY == 1 ]]; then
  note "MOERT_GPU_CHECK_CPU_ONLY=1: stopping after the build (nothing ran on a GPU)"
  exit 0
fi

# MOERT_GPU_STEPS picks what runs after the build (default all): "tests", "bench" (cuda_bench
# and calibrate), "decode" (the PyTorch comparison), e.g. two device calls of ~5 min each:
# MOERT_GPU_STEPS=tests,bench then MOERT_GPU_STEPS=decode (the second, on the still-warm
# machine, reuses the prefix and the build).
STEPS="${MOERT_GPU_STEPS:-tests,bench,decode}"
wants() { [[ ",$STEPS," == *",$1,"* ]]; }

# -- 3. GPU tests ---------------------------------------------------------------------------
if wants tests; then
# Every test labelled gpu (the CUDA backend against the CPU one, fixtures on CUDA, NCCL), then
# the CPU fixture and engine tests as a control that the prefix build itself is sound.
step ctest_gpu 300 ctest --test-dir "$BUILD" -L gpu -E cluster_cuda_nccl --output-on-failure -j 4 --timeout 240
grep -E "tests passed|SKIPPED|Not Run|Failed|\*\*\*" "$LOGS/ctest_gpu.log" | head -n 40 >>"$SUMMARY"
# The engine's actor path on cuda (1 attention + 1 expert stream, one process): the cpu
# backend's greedy tokens, synthetic model and the three fixtures; its summary line on its own.
step engine_cuda 180 "$BUILD/tests/engine_backend_test" "[gpu]" --reporter compact
grep -E "passed|failed|FAILED|warning" "$LOGS/engine_cuda.log" | tail -n 6 >>"$SUMMARY"
# The CLI on the GPU: generate --reference --backend cuda and generate --backend cuda (the
# engine) give the cpu tokens.
step cli_gpu 120 "$BUILD/tests/cli/cli_moert_test" "[gpu]"
tail -n 3 "$LOGS/cli_gpu.log" >>"$SUMMARY"
# Cluster transport nccl: a cuda attention node and a cuda expert node (real `moert node`
# processes), A2E/E2A rows by NCCL, the cpu single-process greedy tokens. Alone (not in
# ctest_gpu above): its node processes and NCCL's init want the GPUs to themselves. It needs
# two GPUs (NCCL refuses two ranks of one communicator on one): on one it says SKIPPED.
step cluster_nccl 180 "$BUILD/tests/cluster_cuda_nccl_test" --reporter compact
grep -E "nccl|passed|failed|SKIPPED" "$LOGS/cluster_nccl.log" | tail -n 6 >>"$SUMMARY"
step ctest_control 240 ctest --test-dir "$BUILD" -R "model_fixtures|engine_engine|gpu_cpu" --output-on-failure -j 4 --timeout 200
grep -E "tests passed" "$LOGS/ctest_control.log" >>"$SUMMARY"
fi

# -- 4. benchmarks --------------------------------------------------------------------------
if wants bench; then
if [[ -x $BUILD/bench/moert_bench_cuda ]]; then
  step cuda_bench 180 "$BUILD/bench/moert_bench_cuda"
  tail -n 30 "$LOGS/cuda_bench.log" >>"$SUMMARY"
else
  note "bench/cuda_bench: no moert_bench_cuda target in this build"
fi
step calibrate 180 "$MOERT" calibrate --backend cuda --out "$OUT/testbed-h200.json"
tail -n 30 "$LOGS/calibrate.log" >>"$SUMMARY"
fi

# -- 5. decode tokens/s: moert --backend cuda vs PyTorch eager on one checkpoint ------------
CK=/tmp/moert-bench-ck
PY=$(command -v python3)
if ! wants decode; then
  :
elif [[ -f $CARRY/make_bench_checkpoint.py ]]; then
  [[ -f $CK/model.safetensors ]] || step checkpoint 240 "$PY" "$CARRY/make_bench_checkpoint.py" "$CK" --dtype bfloat16
  # The figures of `moert bench --model` (prompt 256; decode at 1 and 16 sequences): its
  # reference forward and its engine (every device a CUDA stream) on CUDA (--backend cuda),
  # the engine's expert GEMM switch at its uncalibrated default (the report says so).
  step moert_decode 300 "$MOERT" bench --model "$CK" --backend cuda --reps 3 --tg 64 --tg-batch 16 --tg-prompt 16 \
    --json "$LOGS/moert_decode.json"
  grep -E "^\||^#" "$LOGS/moert_decode.log" >>"$SUMMARY"
  step torch_decode 300 env PYTHONUNBUFFERED=1 "$PY" "$ROOT/bench/torch_decode.py" "$CK" --device cuda --dtype bfloat16 \
    --tg 64 --batches 1,16 --prompt 16 --reps 3 --json "$LOGS/torch_decode.json"
  tail -n 8 "$LOGS/torch_decode.log" >>"$SUMMARY"
else
  note "no $CARRY/make_bench_checkpoint.py: decode comparison skipped"
fi
note "done; logs in $OUT"
