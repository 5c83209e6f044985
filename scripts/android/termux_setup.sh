#!/data/data/com.termux/files/usr/bin/sh
# Runs ON THE PHONE, inside Termux. NOT TESTED on a real phone by this project (docs/ANDROID.md).
#
# Installs what an edgeleak device needs from Termux's own packages (PyPI has no Android build of
# onnxruntime), adds the host's SSH key pushed by deploy_adb.sh, starts Termux's sshd (port 8022)
# and, when deploy_adb.sh --push-only left a bundle in Downloads, copies it to ~/edgeleak.
#
#   termux-setup-storage          # once: lets Termux read ~/storage/downloads (= /sdcard/Download)
#   sh ~/storage/downloads/edgeleak/termux_setup.sh
set -eu

DL=${EDGELEAK_DL:-$HOME/storage/downloads/edgeleak}

pkg install -y python python-numpy python-onnxruntime python-cryptography openssh
if ! python -c "import numpy, onnxruntime, cryptography" 2>/dev/null; then
  echo "termux_setup: numpy or onnxruntime from Termux's packages does not import." >&2
  echo "  Use the proot-distro Debian route in docs/ANDROID.md (pip's aarch64 wheels work there)." >&2
  exit 1
fi

mkdir -p "$HOME/.ssh"
chmod 700 "$HOME/.ssh"
if [ -f "$DL/authorized_keys" ]; then
  touch "$HOME/.ssh/authorized_keys"
  while IFS= read -r key; do
    grep -qxF "$key" "$HOME/.ssh/authorized_keys" || printf '%s\n' "$key" >> "$HOME/.ssh/authorized_keys"
  done < "$DL/authorized_keys"
  chmod 600 "$HOME/.ssh/authorized_keys"
fi
pgrep -x sshd >/dev/null || sshd   # Termux's sshd listens on 8022, any user name
if command -v termux-wake-lock >/dev/null; then
  termux-wake-lock || true  # keep training while the screen is off
fi

if [ -d "$DL/bundle" ]; then
  # /sdcard is mounted noexec and drops permission bits: run the bundle from the home folder.
  rm -rf "$HOME/edgeleak"
  cp -r "$DL/bundle" "$HOME/edgeleak"
  chmod +x "$HOME/edgeleak/start.sh"
  echo "bundle in ~/edgeleak; start it with:  cd ~/edgeleak && EDGELEAK_SYSTEM_SITE=1 ./start.sh"
fi
echo "ready: sshd on port 8022 as $(whoami)"
