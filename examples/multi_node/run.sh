#!/usr/bin/env bash
# Three `moert node` processes on loopback (one attention node, two expert nodes), a shared
# secret they all check, and `moert generate` through them; the same workload in one process
# with --ag 1 --eg 2 must print the same tokens. The nodes are stopped on exit, whatever
# happens. Exits non-zero on a mismatch or any failure.
#
#   examples/multi_node/run.sh [TRANSPORT]      TRANSPORT: ucx-tcp (default), ucx-posix or caf
#
# Environment: MOERT_BUILD (build folder, default build/), MOERT_MODEL (a checkpoint folder;
# default: the embedded model), MOERT_EXAMPLE_PORT (first of three ports, default 17101).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
transport="${1:-ucx-tcp}"
moert="${MOERT_BUILD:-$root/build}/cli/moert"
base_port="${MOERT_EXAMPLE_PORT:-17101}"
case "$transport" in
  ucx-tcp | ucx-posix | caf) ;;
  *) echo "multi_node: transport '$transport' is not one of ucx-tcp, ucx-posix, caf" >&2; exit 2 ;;
esac
[[ -x $moert ]] || { echo "multi_node: $moert not found: build the moert target first" >&2; exit 2; }

work="$(mktemp -d -t moert-multi-node.XXXXXX)"
pids=()
stop_nodes() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    # SIGTERM first (the node releases its devices), SIGKILL after 10 s.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap stop_nodes EXIT

# The shared secret: random, readable by its owner only (moert refuses anything laxer).
(umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/secret")
chmod 600 "$work/secret"

names=(a0 e0 e1)
for i in 0 1 2; do
  port=$((base_port + i))
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "multi_node: port $port is busy (something listens on 127.0.0.1:$port); set MOERT_EXAMPLE_PORT" >&2
    exit 1
  fi
done
for i in 0 1 2; do
  port=$((base_port + i))
  "$moert" node --listen "127.0.0.1:$port" --secret-file "$work/secret" --name "${names[i]}" \
    >"$work/${names[i]}.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 300); do
    grep -q "listening on" "$work/${names[i]}.log" && break
    kill -0 "${pids[i]}" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q "listening on" "$work/${names[i]}.log"; then
    echo "multi_node: node ${names[i]} did not start on port $((base_port + i)):" >&2
    cat "$work/${names[i]}.log" >&2
    exit 1
  fi
done

cat >"$work/cluster.json" <<EOF
{"transport": "$transport",
 "nodes": [{"name": "a0", "address": "127.0.0.1:$base_port", "attention_devices": 1},
           {"name": "e0", "address": "127.0.0.1:$((base_port + 1))", "expert_devices": 1},
           {"name": "e1", "address": "127.0.0.1:$((base_port + 2))", "expert_devices": 1}]}
EOF

model=()
[[ -n ${MOERT_MODEL:-} ]] && model=(--model "$MOERT_MODEL")
workload=(--batch 4 --prompt-length 12 -n 6 --temperature 0.8 --top-k 40 --seed 11)
status=0
for sampling in greedy sampled; do
  args=("${workload[@]}")
  [[ $sampling == greedy ]] && args=(--batch 4 --prompt-length 12 -n 6)
  if ! timeout 300 "$moert" generate "${model[@]}" "${args[@]}" --cluster "$work/cluster.json" \
    --secret-file "$work/secret" >"$work/cluster-$sampling.out" 2>&1; then
    echo "multi_node: moert generate through the nodes ($transport, $sampling) failed:" >&2
    cat "$work/cluster-$sampling.out" >&2
    for n in "${names[@]}"; do echo "--- node $n ---" >&2; cat "$work/$n.log" >&2; done
    exit 1
  fi
  if ! timeout 300 "$moert" generate "${model[@]}" "${args[@]}" --ag 1 --eg 2 \
    >"$work/single-$sampling.out" 2>&1; then
    echo "multi_node: single-process moert generate ($sampling) failed:" >&2
    cat "$work/single-$sampling.out" >&2
    exit 1
  fi
  grep -e '->' "$work/cluster-$sampling.out" >"$work/cluster-$sampling.tokens" || true
  grep -e '->' "$work/single-$sampling.out" >"$work/single-$sampling.tokens" || true
  if [[ ! -s $work/single-$sampling.tokens ]]; then
    echo "multi_node: the single-process run printed no tokens" >&2
    cat "$work/single-$sampling.out" >&2
    exit 1
  fi
  if diff -u "$work/single-$sampling.tokens" "$work/cluster-$sampling.tokens"; then
    echo "multi_node: $sampling: $(wc -l <"$work/single-$sampling.tokens") requests, tokens through 3 nodes" \
      "over $transport = one process (--ag 1 --eg 2)"
  else
    echo "multi_node: $sampling: tokens through 3 nodes over $transport differ from one process (diff above)" >&2
    status=1
  fi
done
grep -e '->' "$work/cluster-sampled.out" | head -2
exit $status
