#!/bin/bash
# Protego GPN container: `protego gpn run` (it forks its own workers).
#
# Environment:
#   PROTEGO_ETCD         etcd endpoints, host:port[,...] (required)
#   PROTEGO_NODE         this GPN's name (default: the hostname)
#   PROTEGO_FABRIC_ADDR  this GPN's fabric address (required: VXLAN and heartbeats)
#   PROTEGO_GPN_BACKEND  userspace | xfrm | auto (default auto)
# Extra arguments are appended to `protego gpn run` (e.g. --workers 4).
set -euo pipefail

: "${PROTEGO_ETCD:?set PROTEGO_ETCD to the etcd endpoints (host:port[,...])}"
: "${PROTEGO_FABRIC_ADDR:?set PROTEGO_FABRIC_ADDR to the fabric address of this GPN}"
export PROTEGO_ETCD
node=${PROTEGO_NODE:-$(hostname)}

exec "${PROTEGO_VENV:-/opt/protego/venv}"/bin/protego -v gpn run --node "$node" \
    --fabric-addr "$PROTEGO_FABRIC_ADDR" --backend "${PROTEGO_GPN_BACKEND:-auto}" "$@"
