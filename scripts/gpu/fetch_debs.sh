#!/usr/bin/env bash
# Runs HERE (the CPU machine, with apt): fetches what scripts/gpu/check.sh needs on a lent GPU
# machine that has CUDA, cuBLAS, NCCL, CMake, ninja, a C++ compiler and PyTorch but none of
# our Debian packages and no network (/work/.library/device/README.md):
#   .debs/          the .deb files of the build's Debian dependencies and of the libraries they
#                   load that such an image may lack (check.sh unpacks them into a prefix)
#   .gpu-carry/     the test fixtures and the bench-checkpoint generator, which live beside the
#                   checkout (../shared) and so would not travel with the tree
# Both folders are listed in .git/info/exclude (never committed) and go to the GPU machine as
# `carry: [".debs", ".gpu-carry"]`. Idempotent: a second run fetches only what is missing.
#   scripts/gpu/fetch_debs.sh            # then: MOERT_GPU_CHECK_CPU_ONLY=1 scripts/gpu/check.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEBS="${MOERT_DEBS_DIR:-$ROOT/.debs}"
CARRY="${MOERT_GPU_CARRY_DIR:-$ROOT/.gpu-carry}"
SHARED="${MOERT_SHARED_DIR:-$ROOT/../shared}"

# The -dev packages of scripts/setup.sh's MOERT_PACKAGES (build tools left out: the GPU image
# has its own compiler, CMake and ninja), then the run-time libraries they depend on. Left
# out on purpose: libc6, libstdc++6, libgcc-s1 and the like, which every image has in a newer
# version — putting Debian 12's older copies on the library path would break its programs.
PACKAGES=(
  # CAF 0.17
  libcaf-dev libcaf-core0.17 libcaf-io0.17 libcaf-openssl0.17
  # UCX 1.13 and what libucs/libuct load (verbs, rdmacm, numa, netlink)
  libucx-dev libucx0 libnuma1 libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200
  # logging, formatting, command line, JSON, tests
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libcli11-dev nlohmann-json3-dev catch2
  # OpenBLAS (bench/ links it) and its Fortran run time
  libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libopenblas0 libgfortran5 libquadmath0
  # tokenizer: regex and Unicode
  libonig-dev libonig5 libutf8proc-dev libutf8proc2
  # HTTP server and TLS
  libcpp-httplib-dev libcpp-httplib0.11 libbrotli-dev libbrotli1 zlib1g-dev libssl-dev libssl3 openssl
  # cmake's FindPkgConfig (cpp-httplib is found through pkg-config)
  pkgconf pkgconf-bin libpkgconf3
)

mkdir -p "$DEBS" "$CARRY"
# The repository's own exclude file (in a git worktree .git is a file: the common dir has it).
exclude="$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir)/info/exclude"
for entry in /.debs/ /.gpu-carry/; do
  grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >>"$exclude"
done

missing=()
for pkg in "${PACKAGES[@]}"; do
  compgen -G "$DEBS/${pkg}_*.deb" >/dev/null || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "fetch_debs: downloading ${#missing[@]} packages into $DEBS"
  (cd "$DEBS" && apt-get download "${missing[@]}")
fi
for pkg in "${PACKAGES[@]}"; do
  compgen -G "$DEBS/${pkg}_*.deb" >/dev/null || { echo "fetch_debs: $pkg did not download" >&2; exit 1; }
done

# Fixtures (the model checkpoints only: tokenizers are not needed by the GPU tests) and the
# generator of the bench checkpoint, which check.sh runs there (1.7 GB is too big to carry).
if [[ -d $SHARED/fixtures ]]; then
  mkdir -p "$CARRY/fixtures"
  for d in "$SHARED"/fixtures/*/; do
    name=$(basename "$d")
    [[ $name == tokenizers ]] && continue
    rm -rf "$CARRY/fixtures/$name" && cp -r "$d" "$CARRY/fixtures/$name"
  done
  cp "$SHARED/fixtures/README.md" "$CARRY/fixtures/" 2>/dev/null || true
else
  echo "fetch_debs: no $SHARED/fixtures: the GPU fixture tests will skip there" >&2
fi
if [[ -f $SHARED/peers/make_bench_checkpoint.py ]]; then
  cp "$SHARED/peers/make_bench_checkpoint.py" "$CARRY/"
else
  echo "fetch_debs: no $SHARED/peers/make_bench_checkpoint.py: check.sh will skip the decode comparison" >&2
fi
chmod -R u+w "$CARRY"

echo "fetch_debs: $(ls "$DEBS"/*.deb | wc -l) .deb files, $(du -sh "$DEBS" | cut -f1) in $DEBS;" \
     "$(du -sh "$CARRY" | cut -f1) in $CARRY"
