#!/usr/bin/env bash
# Build, install and ABI-check Protego's charon plugins against the strongSwan
# that is installed on this machine (Debian's strongswan-charon).
#
#   charon-plugins/build.sh            # as root; idempotent, CI runs it every time
#
# Steps:
#  1. make sure apt has a deb-src entry for the Debian archive hosts this
#     machine already uses (written to /etc/apt/sources.list.d/protego-deb-src.sources);
#  2. `apt-get source strongswan` of the installed version (or the nearest
#     revision of the same upstream version when the exact .dsc is gone) into
#     charon-plugins/.strongswan-src/ (gitignored; other projects' source is
#     built against, never committed);
#  3. compile kernel-protego with a hand-written config.h (strongswan-config.h,
#     no ./configure; it defines ME like Debian's --enable-mediation);
#  4. ABI smoke test (kernel-protego/abi_smoke.c) against the installed
#     libcharon, plus a negative control built without ME that must fail;
#  5. install libstrongswan-kernel-protego.so into /usr/lib/ipsec/plugins and
#     kernel-protego.conf (load = no) into /etc/strongswan.d/charon/.
#
# Environment: PROTEGO_SKIP_INSTALL=1 builds and checks without installing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache="$here/.strongswan-src"
plugin_dir="$here/kernel-protego"
build="$plugin_dir/build"
start=$(date +%s%N)

say() { printf 'build.sh: %s\n' "$*"; }
die() { printf 'build.sh: ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { local ms=$(( ($(date +%s%N) - start) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get and the install need it)"
command -v gcc >/dev/null || die "gcc is missing (apt-get install build-essential)"
command -v dpkg-source >/dev/null || die "dpkg-source is missing (apt-get install dpkg-dev)"

installed=$(dpkg-query -W -f='${Version}' strongswan-charon 2>/dev/null) ||
    die "strongswan-charon is not installed"
upstream=${installed%%-*}
upstream=${upstream#*:}
say "installed strongSwan: $installed (upstream $upstream)"

# --- 1. deb-src entry -------------------------------------------------------
srcs_file=/etc/apt/sources.list.d/protego-deb-src.sources
have_source() { apt-cache showsrc strongswan 2>/dev/null | grep "^Version: ${upstream}-" >/dev/null; }

debian_deb_entries() {
    # "URI SUITES COMPONENTS SIGNED_BY" for every enabled `deb` entry whose
    # host is a Debian archive host (*.debian.org), from deb822 files and
    # one-line sources.list files.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        [ "$f" = "$srcs_file" ] && continue
        awk 'function flush() {
                 if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "")
                     print uris "|" suites "|" comps "|" signed;
                 types = uris = suites = comps = signed = ""; enabled = "" }
             /^[[:space:]]*#/ { next }
             /^[[:space:]]*$/ { flush(); next }
             { key = $1; sub(/:$/, "", key); $1 = ""; sub(/^ /, "");
               if (key == "Types") types = $0; else if (key == "URIs") uris = $0;
               else if (key == "Suites") suites = $0; else if (key == "Components") comps = $0;
               else if (key == "Signed-By") signed = $0; else if (key == "Enabled") enabled = $0 }
             END { flush() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        awk '$1 == "deb" { i = 2; opts = "";
                 if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                 comps = ""; for (j = i + 2; j <= NF; j++) comps = comps (comps ? " " : "") $j;
                 print $i "|" $(i+1) "|" comps "|" }' "$f"
    done
}

if ! have_source; then
    tmp=$(mktemp)
    debian_deb_entries | awk -F'|' '
        { n = split($1, u, " "); keep = "";
          for (k = 1; k <= n; k++) if (u[k] ~ /^https?:\/\/([a-z0-9.-]+\.)?debian\.org(\/|$)/) keep = keep (keep ? " " : "") u[k];
          if (keep == "") next;
          printf "Types: deb-src\nURIs: %s\nSuites: %s\nComponents: %s\n", keep, $2, $3;
          if ($4 != "") printf "Signed-By: %s\n", $4;
          printf "\n" }' > "$tmp"
    [ -s "$tmp" ] || { rm -f "$tmp"; die "no Debian archive (deb.debian.org) entries in /etc/apt/sources.list*"; }
    if ! cmp -s "$tmp" "$srcs_file" 2>/dev/null; then
        { echo "# Written by Protego charon-plugins/build.sh: source entries mirroring"
          echo "# this machine's Debian archive entries (strongSwan headers for plugins)."
          echo
          cat "$tmp"; } > "$srcs_file.new"
        mv "$srcs_file.new" "$srcs_file"
        say "wrote $srcs_file"
    fi
    rm -f "$tmp"
    apt-get update -q >/dev/null || die "apt-get update failed"
    have_source || die "no strongswan ${upstream} source package in the configured archives"
fi

# --- 2. source of the installed version -------------------------------------
src="$cache/strongswan-$upstream"
stamp="$cache/.revision"
if [ ! -f "$src/src/libcharon/kernel/kernel_ipsec.h" ] || [ ! -f "$stamp" ]; then
    rm -rf "$cache"
    mkdir -p "$cache"
    # exact revision first, then the other revisions of the same upstream
    # version, newest first (the orig tarball is the same for all of them)
    candidates=$( { echo "$installed";
                    apt-cache showsrc strongswan | awk '/^Version:/ {print $2}' |
                    { grep "^${upstream}-" || true; } | sort -r -V; } | awk '!seen[$0]++')
    fetched=""
    for v in $candidates; do
        if (cd "$cache" && apt-get source -q "strongswan=$v" >"$cache/apt-source.log" 2>&1); then
            fetched=$v
            break
        fi
        say "source revision $v not available, trying the next"
        find "$cache" -mindepth 1 -maxdepth 1 ! -name apt-source.log -exec rm -rf {} +
    done
    [ -n "$fetched" ] || die "apt-get source strongswan failed for every ${upstream} revision (see $cache/apt-source.log)"
    [ -f "$src/src/libcharon/kernel/kernel_ipsec.h" ] || die "unexpected source layout in $cache"
    echo "$fetched" > "$stamp"
    say "fetched strongswan source $fetched (installed $installed)"
else
    say "using cached strongswan source $(cat "$stamp") in $cache"
fi

# --- 3. compile --------------------------------------------------------------
mkdir -p "$build"
CFLAGS=(-std=gnu11 -O2 -g -fPIC -Wall -Wno-format -Wno-pointer-sign -Wno-unused-parameter
        -Wno-missing-field-initializers -fstack-protector-strong -D_FORTIFY_SOURCE=2
        -include "$here/strongswan-config.h" "-DVERSION=\"$upstream\""
        -I"$src/src/libstrongswan" -I"$src/src/libcharon" -I"$plugin_dir")
LIBS=(/usr/lib/ipsec/libcharon.so.0 /usr/lib/ipsec/libstrongswan.so.0 -lpthread)
SOURCES=("$plugin_dir"/kernel_protego_plugin.c "$plugin_dir"/kernel_protego_ipsec.c
         "$plugin_dir"/kernel_protego_conn.c "$plugin_dir"/kernel_protego_msg.c)
so="$build/libstrongswan-kernel-protego.so"

gcc "${CFLAGS[@]}" -shared -Wl,-z,relro,-z,now -Wl,-soname,libstrongswan-kernel-protego.so \
    -o "$so.new" "${SOURCES[@]}" "${LIBS[@]}" || die "compiling kernel-protego failed"
mv "$so.new" "$so"
say "built $so"

# --- 4. ABI smoke test -------------------------------------------------------
gcc "${CFLAGS[@]}" -o "$build/abi_smoke" "$plugin_dir/abi_smoke.c" "$so" "${LIBS[@]}" \
    -Wl,-rpath,"$build" -Wl,-rpath,/usr/lib/ipsec || die "compiling the ABI smoke test failed"
empty_conf=$(mktemp)
trap 'rm -f "$empty_conf"' EXIT
if ! STRONGSWAN_CONF="$empty_conf" "$build/abi_smoke"; then
    die "ABI smoke test failed: the plugin does not match the installed libcharon; NOT installed"
fi
# negative control: the same test built without ME must notice the wrong layout
gcc "${CFLAGS[@]}" -DPROTEGO_ABI_NEGATIVE_CONTROL -o "$build/abi_smoke_noME" \
    "$plugin_dir/abi_smoke.c" "${SOURCES[@]}" "${LIBS[@]}" -Wl,-rpath,/usr/lib/ipsec ||
    die "compiling the negative control failed"
if STRONGSWAN_CONF="$empty_conf" "$build/abi_smoke_noME" >/dev/null 2>"$build/abi_smoke_noME.log"; then
    die "negative control: a build without ME passed the ABI smoke test, so the test cannot detect the trap"
fi
say "negative control: a build without ME is rejected ($(grep -m1 FAIL "$build/abi_smoke_noME.log" || echo failed))"

# --- 5. install --------------------------------------------------------------
if [ "${PROTEGO_SKIP_INSTALL:-0}" = 1 ]; then
    say "PROTEGO_SKIP_INSTALL=1: not installing"
else
    install -D -m 0644 "$so" /usr/lib/ipsec/plugins/libstrongswan-kernel-protego.so
    install -D -m 0644 "$plugin_dir/kernel-protego.conf" /etc/strongswan.d/charon/kernel-protego.conf
    say "installed /usr/lib/ipsec/plugins/libstrongswan-kernel-protego.so and /etc/strongswan.d/charon/kernel-protego.conf (load = no)"
fi
say "done in $(elapsed) s"
