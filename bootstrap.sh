#!/usr/bin/env bash
# Protego set-up for a fresh Debian 12 machine: system packages, the charon
# plugin, and a virtualenv with the protego package.  Idempotent: run it as
# often as you like; it only installs what is missing.  Must run as root.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap.sh: run as root (it installs Debian packages and a charon plugin)" >&2
    exit 1
fi

# Everything the project runs, at run time and in tests (tests/integration/
# test_setup_packages.py checks every charon plugin and program against this list).
# libstrongswan-standard-plugins: the openssl plugin every charon loads.
# systemd: systemd-analyze verifies the Ansible roles' units.
# qemu-system-x86 kmod busybox-static: the kernel lane's QEMU guest (protego/lane.py).
APT_PACKAGES=(
    strongswan-charon strongswan-swanctl libstrongswan-standard-plugins
    libcharon-extra-plugins libstrongswan-extra-plugins
    nftables python3-nftables etcd-server etcd-client iperf3 iproute2 iputils-ping procps
    python3-venv python3-dev gcc make dpkg-dev strace tcpdump systemd
    qemu-system-x86 kmod busybox-static
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 (for python3-nftables) with the protego package in a venv.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nftables' 2>/dev/null; then
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.protego-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

# Protego's charon plugin (built against the installed strongSwan's source).
if [ -x charon-plugins/build.sh ]; then
    charon-plugins/build.sh
fi

# The kernel lane's guest kernel (Debian's linux-image-amd64, unpacked, not installed)
# for the tests that need kernel ESP. Without it (no network) those tests skip and say so.
if ! .venv/bin/protego lane setup >&2; then
    echo "bootstrap: the kernel lane is not set up (see above): tests marked kernel will skip" >&2
fi
echo "bootstrap: ready (.venv/bin/protego)" >&2
