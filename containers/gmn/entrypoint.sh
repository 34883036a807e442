#!/bin/bash
# Protego GMN container: the `protego gmn run` agent first, then charon once
# the agent serves the kernel-protego socket; exits (stopping the other) as
# soon as either of them dies, so the container runtime restarts the pair.
#
# Environment:
#   PROTEGO_ETCD         etcd endpoints, host:port[,...] (required)
#   PROTEGO_NODE         this GMN's name (default: the hostname)
#   PROTEGO_FABRIC_ADDR  this GMN's fabric address (where the GIN steers IKE)
#   PROTEGO_RUN_DIR      sockets (default /run/protego/gmn)
#   PROTEGO_CHARON_LOG   charon's log file, or stderr (default)
# Extra arguments are appended to `protego gmn run`.
set -euo pipefail

: "${PROTEGO_ETCD:?set PROTEGO_ETCD to the etcd endpoints (host:port[,...])}"
export PROTEGO_ETCD
node=${PROTEGO_NODE:-$(hostname)}
run_dir=${PROTEGO_RUN_DIR:-/run/protego/gmn}
vici=$run_dir/charon.vici
plugin=$run_dir/plugin.sock
charon_log=${PROTEGO_CHARON_LOG:-stderr}
# fixed in the image; overridable only so the script can be tested outside it
conf=${PROTEGO_GMN_CONF:-/etc/protego/gmn/strongswan.conf}
venv=${PROTEGO_VENV:-/opt/protego/venv}
charon=${PROTEGO_CHARON:-/usr/lib/ipsec/charon}

mkdir -p "$run_dir" "$(dirname "$conf")"
rm -f "$plugin" "$vici"    # left over from an earlier run of this container

# strongswan.conf from the same code the testbed uses: kernel-protego first
"$venv/bin/python" - "$vici" "$plugin" "$charon_log" > "$conf" <<'PY'
import sys
from pathlib import Path

from protego.gmn.charon_conf import gmn_strongswan_conf

sys.stdout.write(gmn_strongswan_conf(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
PY

agent_args=(gmn run --node "$node" --vici "$vici" --plugin-socket "$plugin")
if [ -n "${PROTEGO_FABRIC_ADDR:-}" ]; then
    agent_args+=(--fabric-addr "$PROTEGO_FABRIC_ADDR")
fi

agent_pid=""
charon_pid=""
stop() {
    # charon first (it talks to the agent), then the agent
    [ -n "$charon_pid" ] && kill -TERM "$charon_pid" 2>/dev/null || true
    [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null || true
}
trap 'stop' TERM INT

# 1. the agent
"$venv/bin/protego" -v "${agent_args[@]}" "$@" &
agent_pid=$!

# 2. wait for its plugin socket (up to 30 s), as the testbed does
for _ in $(seq 1 300); do
    [ -S "$plugin" ] && break
    if ! kill -0 "$agent_pid" 2>/dev/null; then
        set +e; wait "$agent_pid"; rc=$?; set -e
        echo "protego-gmn: the agent exited (status $rc) before serving $plugin" >&2
        exit "$rc"
    fi
    sleep 0.1
done
if [ ! -S "$plugin" ]; then
    echo "protego-gmn: the agent did not create $plugin within 30 s" >&2
    stop
    wait || true
    exit 1
fi

# 3. charon with our strongswan.conf
STRONGSWAN_CONF=$conf "$charon" &
charon_pid=$!

# 4. supervise: the first of the two to exit ends the container
set +e
wait -n "$agent_pid" "$charon_pid"
rc=$?
if kill -0 "$agent_pid" 2>/dev/null && kill -0 "$charon_pid" 2>/dev/null; then
    # woken by a signal: both still run
    rc=0
else
    echo "protego-gmn: $(kill -0 "$agent_pid" 2>/dev/null && echo charon || echo the agent) exited (status $rc); stopping" >&2
fi
stop
wait
exit "$rc"
