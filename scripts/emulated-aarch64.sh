#!/usr/bin/env bash
# An emulated aarch64 "device" on an x86-64 Linux machine: qemu-user + Debian's arm64 Python 3.11 +
# the aarch64 apache-tvm wheel (runtime only: no torch, no onnx). Used by tests/test_edge_rpc.py and
# handy for trying `bndeploy device serve` without a board.
#
#   scripts/emulated-aarch64.sh setup            install/cache everything (idempotent; needs root for apt)
#   scripts/emulated-aarch64.sh check            exit 0 when the emulated root is ready, else say what is missing
#   scripts/emulated-aarch64.sh python ARGS...   run the emulated arm64 python (bndeploy importable)
#   scripts/emulated-aarch64.sh serve ARGS...    = python -m bndeploy.cli device serve ARGS...
#
# Cache: $BNDEPLOY_AARCH64_ROOT (default ~/.cache/bndeploy/aarch64-root): root/ (the unpacked arm64
# packages), site/ (the aarch64 wheels), pkgs/ (the downloaded .debs), and a stamp file holding the
# versions it was built for. Delete the folder to rebuild it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${BNDEPLOY_AARCH64_ROOT:-$HOME/.cache/bndeploy/aarch64-root}"
ROOT="$CACHE/root"
SITE="$CACHE/site"
TVM_VERSION="0.27.0.post1"
TVM_FFI_VERSION="0.1.14.post1"  # 0.1.15.x segfaults in tvm.ir.save_json (see ARCHITECTURE/notes)
STAMP="$CACHE/ready-tvm-$TVM_VERSION-ffi-$TVM_FFI_VERSION"
# Debian arm64 packages whose dependency closure makes a working python3.11 (+ libstdc++ for TVM).
ROOT_PACKAGES=(python3.11-minimal libpython3.11-stdlib libstdc++6)

say() { echo "emulated-aarch64: $*" >&2; }
die() { say "error: $*"; exit 2; }

host_python() {
    if [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"; else command -v python3; fi
}

ensure_qemu() {
    command -v qemu-aarch64 >/dev/null && return
    [[ $(id -u) == 0 ]] || die "qemu-aarch64 is missing; install the Debian package qemu-user (as root)"
    say "installing qemu-user"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null; }
}

# Prints the arm64 packages to unpack, or nothing when apt knows none (a fresh machine's apt has no
# arm64 lists until `apt-get update`). Never fails: an empty answer is the caller's cue to update.
arm64_package_closure() {
    { apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances "${ROOT_PACKAGES[@]/%/:arm64}" 2>/dev/null || true; } \
        | { grep -E '^[a-z0-9][^ <]*:arm64$' || true; } | { grep -vE '^(dpkg|tar|install-info):' || true; } | sort -u
}

# Downloads the given packages into $CACHE/pkgs; fails when any of them cannot be fetched (for instance
# lists older than the mirror, which no longer has those versions).
download_packages() {
    rm -rf "$CACHE/pkgs" && mkdir -p "$CACHE/pkgs"  # only this closure gets unpacked
    # shellcheck disable=SC2086
    (cd "$CACHE/pkgs" && apt-get download -qq $1 2>&1) | { grep -v "^W: Download is performed unsandboxed" || true; }
}

ensure_root() {
    [[ -x "$ROOT/usr/bin/python3.11" ]] && return
    [[ $(id -u) == 0 ]] || die "building the arm64 root needs root (dpkg --add-architecture, apt-get update)"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        say "adding the arm64 architecture to dpkg"
        dpkg --add-architecture arm64
    fi
    local packages
    packages="$(arm64_package_closure)"
    if [[ -z "$packages" ]] || ! download_packages "$packages"; then
        say "updating apt's package lists (arm64 packages unknown or out of date)"
        apt-get update -qq || die "apt-get update failed"
        packages="$(arm64_package_closure)"
        [[ -n "$packages" ]] || die "apt knows no arm64 packages for ${ROOT_PACKAGES[*]} (is the arm64 architecture in apt's sources?)"
        download_packages "$packages" || die "apt-get download of the arm64 packages failed"
    fi
    say "downloaded $(wc -w <<<"$packages") arm64 packages"
    local tmp="$ROOT.partial"
    rm -rf "$tmp" && mkdir -p "$tmp"
    for deb in "$CACHE"/pkgs/*_arm64.deb; do dpkg -x "$deb" "$tmp"; done
    [[ -x "$tmp/usr/bin/python3.11" ]] || die "the arm64 packages unpacked without usr/bin/python3.11"
    rm -rf "$ROOT" && mv "$tmp" "$ROOT"
}

ensure_site() {
    [[ -f "$STAMP" ]] && return
    say "installing the aarch64 wheels (apache-tvm $TVM_VERSION, numpy) into $SITE"
    local tmp="$SITE.partial"
    rm -rf "$tmp"
    "$(host_python)" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --target "$tmp" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" numpy ml_dtypes typing_extensions
    rm -rf "$SITE" && mv "$tmp" "$SITE"
    touch "$STAMP"
}

# bndeploy's packages map bndeploy.runtime -> runtime/ (pyproject package-dir); an overlay of symlinks
# gives the emulated python the working tree's current code without installing it.
overlay() {
    # One overlay per checkout, refreshed in place (never deleted) so concurrent runs do not race.
    local dir
    dir="$CACHE/overlay/$(printf %s "$REPO" | sha1sum | cut -c1-12)"
    mkdir -p "$dir/bndeploy"
    for f in "$REPO"/bndeploy/*.py; do ln -sfn "$f" "$dir/bndeploy/"; done
    ln -sfn "$REPO/runtime" "$dir/bndeploy/runtime"
    echo "$dir"
}

missing() {
    command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 (Debian package qemu-user)"; return; }
    [[ -x "$ROOT/usr/bin/python3.11" ]] || { echo "the arm64 python root $ROOT"; return; }
    [[ -f "$STAMP" ]] || echo "the aarch64 TVM wheels in $SITE"
}

run_python() {
    local what
    what="$(missing)"
    [[ -z "$what" ]] || die "not set up: $what is missing; run scripts/emulated-aarch64.sh setup"
    local pythonpath
    pythonpath="$SITE:$(overlay)"
    # TVM_USE_RUNTIME_LIB: load libtvm_runtime only (the compiler library is not needed on a device).
    # PYTHONSAFEPATH: never import from the current folder (a checkout has bndeploy/ without runtime/).
    exec env TVM_USE_RUNTIME_LIB=1 PYTHONPATH="$pythonpath" PYTHONDONTWRITEBYTECODE=1 PYTHONSAFEPATH=1 \
        QEMU_LD_PREFIX="$ROOT" qemu-aarch64 -L "$ROOT" "$ROOT/usr/bin/python3.11" "$@"
}

case "${1:-}" in
    setup)
        ensure_qemu
        ensure_root
        ensure_site
        say "ready: $ROOT (python) + $SITE (wheels)"
        ;;
    check)
        what="$(missing)"
        if [[ -n "$what" ]]; then echo "missing: $what"; exit 1; fi
        echo "ready: $CACHE"
        ;;
    python) shift; run_python "$@" ;;
    serve) shift; run_python -m bndeploy.cli device serve "$@" ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
