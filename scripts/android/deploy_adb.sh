#!/usr/bin/env bash
# Runs ON THE HOST. Deploys an edgeleak device bundle to an Android phone with Termux over USB.
# NOT TESTED on a real phone by this project (docs/ANDROID.md says what is and is not tested).
#
#   scripts/android/deploy_adb.sh BUNDLE [--broker-port 1883] [--id phone-1] [--serial SERIAL]
#                                        [--key ~/.ssh/id_ed25519] [--push-only]
#
# 1. pushes termux_setup.sh and your public key to /sdcard/Download/edgeleak/ (with --push-only,
#    the bundle too) and tells you the one command to run in Termux the first time;
# 2. adb reverse: the phone's 127.0.0.1:BROKER_PORT reaches the broker on this host;
#    adb forward: this host's 127.0.0.1:8022 reaches Termux's sshd;
# 3. unless --push-only: copies the bundle and starts it over SSH with devices.deploy.deploy_ssh
#    (the code path tested here against a real sshd), broker mqtt://127.0.0.1:BROKER_PORT.
set -euo pipefail

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
BUNDLE=$1; shift
PORT=1883; ID=phone-1; SERIAL=; KEY=$HOME/.ssh/id_ed25519; PUSH_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --broker-port) PORT=$2; shift 2 ;;
    --id) ID=$2; shift 2 ;;
    --serial) SERIAL=$2; shift 2 ;;
    --key) KEY=$2; shift 2 ;;
    --push-only) PUSH_ONLY=1; shift ;;
    *) usage ;;
  esac
done
[ -f "$BUNDLE/start.sh" ] || { echo "$BUNDLE: no start.sh; build it with 'edgeleak device bundle'" >&2; exit 2; }
command -v adb >/dev/null || { echo "adb is missing: apt-get install -y adb" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
ADB=(adb); [ -n "$SERIAL" ] && ADB+=(-s "$SERIAL")
DL=/sdcard/Download/edgeleak

"${ADB[@]}" wait-for-device
"${ADB[@]}" shell mkdir -p "$DL"
"${ADB[@]}" push "$HERE/termux_setup.sh" "$DL/termux_setup.sh" >/dev/null
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -f "$KEY"
"${ADB[@]}" push "$KEY.pub" "$DL/authorized_keys" >/dev/null
"${ADB[@]}" reverse "tcp:$PORT" "tcp:$PORT"
"${ADB[@]}" forward tcp:8022 tcp:8022

if [ "$PUSH_ONLY" = 1 ]; then
  "${ADB[@]}" shell rm -rf "$DL/bundle"
  "${ADB[@]}" push "$BUNDLE" "$DL/bundle" >/dev/null
  echo "pushed. In Termux: termux-setup-storage (once), then"
  echo "  sh ~/storage/downloads/edgeleak/termux_setup.sh && cd ~/edgeleak && \\"
  echo "    EDGELEAK_SYSTEM_SITE=1 ./start.sh --broker mqtt://127.0.0.1:$PORT --id $ID"
  exit 0
fi

if ! ssh -p 8022 -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o ConnectTimeout=5 \
    127.0.0.1 true 2>/dev/null; then
  echo "Termux's sshd does not answer on the forwarded port 8022. In Termux, run once:" >&2
  echo "  termux-setup-storage; sh ~/storage/downloads/edgeleak/termux_setup.sh" >&2
  exit 1
fi
cd "$REPO"
"$PYTHON" - "$BUNDLE" "$KEY" "$PORT" "$ID" <<'PY'
import sys
from devices.deploy import deploy_ssh

bundle, key, port, device_id = sys.argv[1:]
dep = deploy_ssh(
    bundle, "ssh://127.0.0.1:8022/~/edgeleak", identity=key,
    ssh_options=["-o", "StrictHostKeyChecking=accept-new"],
    args=["--broker", f"mqtt://127.0.0.1:{port}", "--id", device_id],
    env={"EDGELEAK_SYSTEM_SITE": "1"},
)
print(f"started {device_id} on the phone (pid {dep.pid}); log: ssh -p 8022 127.0.0.1 cat ~/edgeleak/device.log")
PY
