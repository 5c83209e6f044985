#!/usr/bin/env bash
# Build (or reuse) the Raspberry Pi stand-in: an arm64 Debian bookworm root (the base of Raspberry
# Pi OS 64-bit) run through qemu-user, with real aarch64 wheels of the device packages in /wheels.
#
#   sudo scripts/rpi_standin.sh [ROOT]        # default /var/cache/edgeleak/arm64-root (~5 min once)
#   EDGELEAK_ARM64_ROOT=ROOT pytest -m slow tests/test_deploy.py
#
# Needs root, Debian's qemu-user-static, binfmt-support and debootstrap (installed if missing), and
# a host Python with pip (PYTHON, default: the repo's .venv, else python3) to download the wheels:
# pip inside the chroot cannot verify the package index's certificate. A finished root has the file
# ROOT/.edgeleak-standin; run again to refresh the wheels only.
set -euo pipefail

ROOT=${1:-${EDGELEAK_ARM64_ROOT:-/var/cache/edgeleak/arm64-root}}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$HERE/.venv/bin/python" ] && echo "$HERE/.venv/bin/python" || echo python3)}
PACKAGES=(numpy paho-mqtt onnxruntime cryptography)  # what the bundled edge package imports

[ "$(id -u)" = 0 ] || { echo "rpi_standin.sh: run as root (debootstrap, binfmt_misc)" >&2; exit 2; }

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# aarch64 binaries run through qemu: register the interpreter with the kernel.
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || {
  echo "rpi_standin.sh: qemu-aarch64 is not registered in binfmt_misc" >&2; exit 1; }

# The Debian mirror this machine's apt already uses (the only one reachable here).
mirror() {
  local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
  cat "${files[@]}" 2>/dev/null | grep -v security | awk '
    /^URIs:/ && !m { m = $2 }
    /^deb / && !m { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { m = $i; break } }
    END { print m }' || true
}
MIRROR=${MIRROR:-$(mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  echo "debootstrap arm64 bookworm into $ROOT from $MIRROR"
  rm -rf "$ROOT.partial"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT.partial" "$MIRROR"
  rm -rf "$ROOT"
  mv "$ROOT.partial" "$ROOT"
fi

echo "aarch64 wheels for ${PACKAGES[*]} into $ROOT/wheels"
mkdir -p "$ROOT/wheels"
"$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 -d "$ROOT/wheels" "${PACKAGES[@]}"

# Check: the packages install from /wheels and import under aarch64.
chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root /bin/sh -c '
  set -e
  [ -x /opt/edgeleak-check/bin/python ] || python3 -m venv /opt/edgeleak-check
  /opt/edgeleak-check/bin/pip install -q --no-index --find-links /wheels '"${PACKAGES[*]}"'
  /opt/edgeleak-check/bin/python -c "import platform, numpy, onnxruntime, paho.mqtt, cryptography
print(platform.machine(), \"python\", platform.python_version(), \"numpy\", numpy.__version__,
      \"onnxruntime\", onnxruntime.__version__)"' | tee "$ROOT/.edgeleak-standin.tmp"
grep -q '^aarch64 ' "$ROOT/.edgeleak-standin.tmp"
mv "$ROOT/.edgeleak-standin.tmp" "$ROOT/.edgeleak-standin"
echo "ready: EDGELEAK_ARM64_ROOT=$ROOT"
