"""Deployment to physical devices: a self-contained bundle, copied and started over SSH.

A bundle is a folder that runs on any device with Python 3.11+::

    edge/              the device package, copied from this repository (no other package of ours)
    model/             the exported artifact: manifest.json and every file it names
    data.npz           the device's shard (optional: else pass --data to start.sh)
    config.json        settings for ``python -m edge --config`` (broker, run, id, runtime, profile)
    requirements.txt   what edge imports: numpy, paho-mqtt, onnxruntime, cryptography (pins from pyproject.toml)
    start.sh           creates .venv on first start, then runs ``python -m edge --config config.json``
                       (``./start.sh calibrate`` measures the device's ``train_gflops`` instead)
    wheels/            (optional) wheels for an offline install

``start.sh`` arguments override config.json (e.g. ``./start.sh --id pi-7``). Environment:
``EDGELEAK_PYTHON`` runs an interpreter that already has the packages (no venv);
``EDGELEAK_WHEELS`` installs from that folder of wheels without the package index (also used
when the bundle has ``wheels/``); ``EDGELEAK_SYSTEM_SITE=1`` lets the venv see system packages
(Termux's ``python-numpy``).
"""

from __future__ import annotations

import io
import json
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import edge
from devices.profiles import PROFILES
from edge.backends import RUNTIMES
from edge.data import load_shard
from edge.manifest import MANIFEST_FILE, ModelArtifact

# What ``edge`` imports on a device, pinned as in pyproject.toml's base install. The safetensors
# package is not among them (edge.codec reads the layout with numpy): leaving it out spares
# Termux a Rust build.
BASE_REQUIREMENTS = (
    "numpy>=1.26",
    "paho-mqtt>=2.1,<3",
    "onnxruntime>=1.20",
    "cryptography>=42",  # edge.secagg; aarch64 wheels exist
)
EXTRA_REQUIREMENTS = {
    "onnx": (),
    "torch": ("torch==2.13.0",),
    "executorch": ("torch==2.13.0", "executorch==1.5.1"),
}
SECURE_REQUIREMENT = "cryptography>=42"  # secure mode: TLS identity and signatures (edge.sign)
ARTIFACT_FOR = {"onnx": "onnx_grad", "torch": "pt2", "executorch": "pte"}
LOG_FILE = "device.log"

START_SH = """\
#!/bin/sh
# Start this edgeleak device. First start: creates .venv and installs requirements.txt (offline
# from $EDGELEAK_WHEELS or ./wheels when present). Arguments override config.json.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
if [ -n "${EDGELEAK_PYTHON:-}" ]; then
  PY=$EDGELEAK_PYTHON
else
  VENV=${EDGELEAK_VENV:-$HERE/.venv}
  if [ ! -f "$VENV/.edgeleak-ready" ]; then
    if [ "${EDGELEAK_SYSTEM_SITE:-0}" = 1 ]; then
      python3 -m venv --system-site-packages "$VENV"
    else
      python3 -m venv "$VENV"
    fi
    WHEELS=${EDGELEAK_WHEELS:-$HERE/wheels}
    if [ -d "$WHEELS" ]; then
      "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" -r requirements.txt
    else
      "$VENV/bin/python" -m pip install -q -r requirements.txt
    fi
    touch "$VENV/.edgeleak-ready"
  fi
  PY=$VENV/bin/python
fi
if [ "${1:-}" = calibrate ]; then  # ./start.sh calibrate: this device's train_gflops
  shift
  exec "$PY" -m edge calibrate --model "$HERE/model" "$@"
fi
exec "$PY" -m edge --config "$HERE/config.json" "$@"
"""


def requirements(runtime: str) -> tuple[str, ...]:
    """Packages a device needs for ``runtime`` (the base install, plus torch for the others)."""
    if runtime not in EXTRA_REQUIREMENTS:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    return BASE_REQUIREMENTS + EXTRA_REQUIREMENTS[runtime]


def bundle_config(
    *,
    runtime: str,
    profile: str,
    data: bool,
    broker: str | None,
    run: str | None,
    device_id: str | None,
    seed: int,
) -> dict[str, object]:
    """config.json of a bundle: the settings of ``python -m edge`` that are known now."""
    cfg: dict[str, object] = {
        "model": "model",
        "runtime": runtime,
        "profile": profile,
        "seed": seed,
    }
    for key, value in (
        ("data", "data.npz" if data else None),
        ("broker", broker),
        ("run", run),
        ("id", device_id),
    ):
        if value:
            cfg[key] = value
    return cfg


def _copy_edge(dst: Path) -> None:
    src = Path(edge.__file__).parent
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build_bundle(
    out: str | Path,
    *,
    model_dir: str | Path,
    runtime: str,
    profile: str,
    data: str | Path | None = None,
    broker: str | None = None,
    run: str | None = None,
    device_id: str | None = None,
    seed: int = 0,
    wheels: str | Path | None = None,
    pki: str | Path | None = None,
) -> Path:
    """Write a device bundle into ``out`` (which must not exist or be empty); returns its path.
    ``pki``: the PKI folder the device (``device_id``) is enrolled in; the bundle carries its
    credentials (``edge.sign.bundle_files``) in ``pki/`` for a ``mqtts://`` broker."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give a new folder for the bundle")
    reqs = requirements(runtime)
    creds: list[str] = []
    if pki is not None:
        from edge.sign import bundle_files

        if not device_id:
            raise ValueError("a bundle with credentials (--pki) needs the device's --id")
        creds = bundle_files(device_id)
        missing = [c for c in creds if not (Path(pki) / c).is_file()]
        if missing:
            raise ValueError(
                f"--pki {pki}: no {', '.join(missing)}; enrol first: edgeleak pki enroll {pki} "
                f"--device {device_id} (and the coordinator: --role coordinator)"
            )
        reqs = (*reqs, SECURE_REQUIREMENT)
    if profile and profile not in PROFILES:
        raise ValueError(
            f"unknown device profile {profile!r}; expected one of {', '.join(PROFILES)}"
        )
    artifact = ModelArtifact.load(model_dir)  # checks the content hash
    artifact.path(ARTIFACT_FOR[runtime])  # names the re-export when the runtime's file is missing
    if data is not None:
        load_shard(data)  # fails here, not on the device
    out.mkdir(parents=True, exist_ok=True)
    _copy_edge(out / "edge")
    (out / "model").mkdir()
    shutil.copy2(artifact.folder / MANIFEST_FILE, out / "model" / MANIFEST_FILE)
    for name in artifact.manifest.artifacts.values():
        shutil.copy2(artifact.folder / name, out / "model" / name)
    if data is not None:
        shutil.copy2(data, out / "data.npz")
    if wheels is not None:
        shutil.copytree(wheels, out / "wheels")
    for rel in creds:
        (out / "pki" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(pki or "") / rel, out / "pki" / rel)
    cfg = bundle_config(
        runtime=runtime,
        profile=profile,
        data=data is not None,
        broker=broker,
        run=run,
        device_id=device_id,
        seed=seed,
    )
    if creds:
        cfg["pki"] = "pki"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    (out / "start.sh").write_text(START_SH)
    (out / "start.sh").chmod(0o755)
    return out


# -- SSH ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    """``ssh://user@host[:port]/path``; a path starting ``/~/`` is relative to the home folder."""

    user: str | None
    host: str
    port: int
    path: str

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def remote_dir(self) -> str:
        """The folder as a remote shell expression (home-relative paths stay unquoted at ~)."""
        if self.path.startswith("~/"):
            return "~/" + shlex.quote(self.path[2:])
        return shlex.quote(self.path)


def parse_ssh_url(url: str) -> SshTarget:
    """Parse ``ssh://user@host[:port]/path``; the error shows the expected form."""
    p = urlparse(url)
    path = unquote(p.path)
    if p.scheme != "ssh" or not p.hostname or not path or path == "/":
        raise ValueError(
            f"deploy target {url!r}: expected ssh://user@host[:port]/path "
            f"(e.g. ssh://pi@raspberrypi.local/~/edgeleak)"
        )
    path = path[1:] if path.startswith("/~/") else path
    return SshTarget(p.username, p.hostname, p.port or 22, path)


def ssh_argv(
    target: SshTarget, *, identity: str | Path | None = None, options: Sequence[str] = ()
) -> list[str]:
    """The ``ssh`` command line for ``target`` (batch mode: never prompts)."""
    argv = ["ssh", "-p", str(target.port), "-o", "BatchMode=yes"]
    if identity is not None:
        argv += ["-i", str(identity)]
    return [*argv, *options, target.destination]


def remote_start_command(
    remote_dir: str, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> str:
    """Shell command that starts the bundle in the background, logs to device.log, prints its PID."""
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    cmd = " ".join(shlex.quote(a) for a in ("./start.sh", *args))
    env_cmd = f"env {assigns} " if assigns else ""
    # Only the device runs in the background, with every descriptor redirected: ssh returns.
    return f"cd {remote_dir} && ({env_cmd}nohup {cmd} > {LOG_FILE} 2>&1 < /dev/null & echo $!)"


def _tar(bundle: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(bundle.iterdir()):
            if p.name != ".venv":
                tar.add(p, arcname=p.name)
    return buf.getvalue()


@dataclass(frozen=True)
class Deployment:
    """A bundle on a remote device, and the PID of its device process (0 when not started)."""

    target: SshTarget
    ssh: tuple[str, ...]
    pid: int

    def _remote(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ssh, command], capture_output=True, text=True, timeout=timeout)

    def log(self) -> str:
        """The device's output so far (device.log in the bundle folder)."""
        return self._remote(f"cat {self.target.remote_dir}/{LOG_FILE}").stdout

    def running(self) -> bool:
        return self.pid > 0 and self._remote(f"kill -0 {self.pid}").returncode == 0

    def stop(self) -> None:
        """Stop the device process (SIGTERM)."""
        if self.pid > 0:
            self._remote(f"kill {self.pid} 2>/dev/null || true")


def deploy_ssh(
    bundle: str | Path,
    url: str,
    *,
    identity: str | Path | None = None,
    ssh_options: Sequence[str] = (),
    start: bool = True,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
) -> Deployment:
    """Copy ``bundle`` to ``ssh://user@host[:port]/path`` (a tar stream over ssh: the remote needs
    only sh and tar) and, with ``start``, run its start.sh there in the background."""
    bundle = Path(bundle)
    if not (bundle / "start.sh").is_file():
        raise FileNotFoundError(f"{bundle} has no start.sh: build it with build_bundle first")
    target = parse_ssh_url(url)
    ssh = ssh_argv(target, identity=identity, options=ssh_options)
    copy = subprocess.run(
        [*ssh, f"mkdir -p {target.remote_dir} && tar -C {target.remote_dir} -xzf -"],
        input=_tar(bundle),
        capture_output=True,
        timeout=timeout,
    )
    if copy.returncode != 0:
        raise RuntimeError(
            f"copying {bundle} to {url} failed ({copy.returncode}): "
            f"{copy.stderr.decode(errors='replace').strip()}"
        )
    pid = 0
    if start:
        res = subprocess.run(
            [*ssh, remote_start_command(target.remote_dir, args=args, env=env)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0 or not res.stdout.strip().isdigit():
            raise RuntimeError(
                f"starting the device on {url} failed ({res.returncode}): "
                f"{res.stderr.strip() or res.stdout.strip()}"
            )
        pid = int(res.stdout.strip())
    return Deployment(target, tuple(ssh), pid)
