#!/usr/bin/env bash
# Shared set-up for scripts/run.sh and scripts/test.sh: installs the Debian packages moert
# needs (only when one is missing), then configures and builds Release into build/.
# Idempotent: a second run installs nothing and rebuilds only what changed.
set -euo pipefail

MOERT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOERT_BUILD="${MOERT_BUILD:-$MOERT_ROOT/build}"
# ccache hits across clones in other folders (CI clones afresh each run).
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$MOERT_ROOT}"

MOERT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config
  libcaf-dev libucx-dev ucx-utils libspdlog-dev catch2 libopenblas-dev
  nlohmann-json3-dev libcli11-dev
  libonig-dev libutf8proc-dev libcpp-httplib-dev libssl-dev openssl
)

moert_install_packages() {
  local missing=()
  for pkg in "${MOERT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  echo "moert: installing Debian packages: ${missing[*]}"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# moert_build DIR [cmake args...] [-- targets...]
moert_build() {
  local dir=$1
  shift
  local args=() targets=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      shift
      targets=("$@")
      break
    fi
    args+=("$1")
    shift
  done
  if [[ ! -f $dir/CMakeCache.txt ]]; then
    cmake -S "$MOERT_ROOT" -B "$dir" -G Ninja "${args[@]}" >"$dir.configure.log" 2>&1 ||
      { cat "$dir.configure.log"; return 1; }
  fi
  local jobs
  jobs=$(nproc)
  if ((${#targets[@]})); then
    cmake --build "$dir" -j "$jobs" --target "${targets[@]}"
  else
    cmake --build "$dir" -j "$jobs"
  fi
}

moert_install_packages
mkdir -p "$(dirname "$MOERT_BUILD")"
moert_build "$MOERT_BUILD" -DCMAKE_BUILD_TYPE=Release
