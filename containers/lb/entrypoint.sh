#!/bin/bash
# Protego GIN/GEN container: `protego lb run`.
#
# Environment:
#   PROTEGO_ETCD         etcd endpoints, host:port[,...] (required)
#   PROTEGO_NODE         this agent's name (default: the hostname)
#   PROTEGO_LB_ROLE      gin | gen | both (default both)
#   PROTEGO_LB_VIPS      prefixes holding the VIPs, comma-separated (e.g. 203.0.113.0/24)
#   PROTEGO_FABRIC_ADDR  address of the heartbeat socket (default 0.0.0.0)
# Extra arguments are appended to `protego lb run` (e.g. --sample 500).
set -euo pipefail

: "${PROTEGO_ETCD:?set PROTEGO_ETCD to the etcd endpoints (host:port[,...])}"
node=${PROTEGO_NODE:-$(hostname)}

args=(lb run --role "${PROTEGO_LB_ROLE:-both}" --node "$node" --hb-bind "${PROTEGO_FABRIC_ADDR:-0.0.0.0}")
IFS=',' read -r -a endpoints <<< "$PROTEGO_ETCD"
for e in "${endpoints[@]}"; do
    [ -n "$e" ] && args+=(--etcd "$e")
done
IFS=',' read -r -a vips <<< "${PROTEGO_LB_VIPS:-}"
for v in "${vips[@]}"; do
    [ -n "$v" ] && args+=(--vip "$v")
done

exec "${PROTEGO_VENV:-/opt/protego/venv}"/bin/protego -v "${args[@]}" "$@"
