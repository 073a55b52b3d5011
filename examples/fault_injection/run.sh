#!/usr/bin/env bash
# A config-driven chaos run: `moert eval` once without faults and once under the fault plan
# in faults.json (seeded drops, duplicates, reorders and delays of A2E/E2A messages and a slow
# expert device), on 2 attention + 3 expert devices. Prints what the injector did and what
# recovery cost, and checks that the output under faults is the fault-free one, byte for byte.
# Exits non-zero on a mismatch or any failure.
#
#   examples/fault_injection/run.sh [FAULT_FILE]     default: faults.json beside this script
#
# Environment: MOERT_BUILD (build folder, default build/), MOERT_MODEL (a checkpoint folder
# with prompts.json; default: ../shared/fixtures/qwen3_moe_tiny).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
faults="${1:-$root/examples/fault_injection/faults.json}"
moert="${MOERT_BUILD:-$root/build}/cli/moert"
model="${MOERT_MODEL:-$root/../shared/fixtures/qwen3_moe_tiny}"
[[ -x $moert ]] || { echo "fault_injection: $moert not found: build the moert target first" >&2; exit 2; }
[[ -f $faults ]] || { echo "fault_injection: fault file '$faults' not found" >&2; exit 2; }
if [[ ! -f $model/config.json || ! -f $model/prompts.json ]]; then
  echo "fault_injection: skipped: no checkpoint with prompts.json at '$model' (set MOERT_MODEL)"
  exit 0
fi

work="$(mktemp -d -t moert-fault-injection.XXXXXX)"
trap 'rm -rf "$work"' EXIT
common=(eval --model "$model" --prompts "$model/prompts.json" --greedy 8 --ag 2 --eg 3)

seconds() { date +%s.%N; }
t0=$(seconds)
"$moert" "${common[@]}" --out "$work/clean.json" >/dev/null
t1=$(seconds)
"$moert" "${common[@]}" --faults "$faults" --faults-report "$work/report.json" --out "$work/faulty.json" \
  | grep "faults injected"
t2=$(seconds)

echo "fault file: $faults"
echo "report:     $(cat "$work/report.json")"
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "time:       %.2f s fault-free, %.2f s under faults\n", b - a, c - b }'
if cmp -s "$work/clean.json" "$work/faulty.json"; then
  echo "fault_injection: output under faults is byte-identical to the fault-free output"
else
  echo "fault_injection: MISMATCH: the output under faults differs from the fault-free output" >&2
  exit 1
fi
