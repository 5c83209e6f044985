"""Deployment: a self-contained bundle, started over a real sshd, and on the arm64 Raspberry Pi
stand-in (DESIGN.md) where one is built."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.deploy import (
    BASE_REQUIREMENTS,
    build_bundle,
    deploy_ssh,
    parse_ssh_url,
    remote_start_command,
)
from devices.fleet import Fleet
from edge.data import save_shard
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.broker import free_port
from tests.fedutil import contiguous_shards, fleet

REPO = Path(__file__).resolve().parents[1]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _shard(path: Path, start: int, n: int = 40) -> Path:
    data = load_dataset("fashion-mnist")
    save_shard(path, data.x_train[start : start + n], data.y_train[start : start + n])
    return path


def test_bundle_is_self_contained(lenet_artifact: ModelArtifact, tmp_path: Path) -> None:
    shard = _shard(tmp_path / "shard.npz", 0)
    b = build_bundle(
        tmp_path / "b",
        model_dir=lenet_artifact.folder,
        runtime="onnx",
        profile="rpi4",
        data=shard,
        broker="mqtt://10.0.0.5:1883",
        run="r1",
    )
    assert sorted(p.name for p in b.iterdir()) == [
        "config.json",
        "data.npz",
        "edge",
        "model",
        "requirements.txt",
        "start.sh",
    ]
    assert json.loads((b / "config.json").read_text()) == {
        "model": "model",
        "runtime": "onnx",
        "profile": "rpi4",
        "seed": 0,
        "data": "data.npz",
        "broker": "mqtt://10.0.0.5:1883",
        "run": "r1",
    }
    # The requirements cover every package the bundled edge imports (torch only in its optional
    # backends), pinned as in the base install.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert (b / "requirements.txt").read_text().split() == list(BASE_REQUIREMENTS)
    assert set(BASE_REQUIREMENTS) <= set(deps)
    imported = set()
    for path in (b / "edge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            for name in names:
                top = str(name).split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("edge", "__future__"):
                    imported.add((top, path.name))
    optional = ("torch_ref.py", "executorch.py", "sign.py", "he.py")
    assert {t for t, f in imported if f not in optional} == {
        "numpy",
        "paho",
        "onnxruntime",
        "cryptography",  # edge.secagg
    }
    # Secure mode's module only (imported with --pki; a bundle built with --pki requires it).
    assert {t for t, f in imported if f == "sign.py"} == {"numpy", "cryptography"}
    # Homomorphic encryption's module only (extra 'he'; laptop-emulated devices: no aarch64 wheel).
    assert {t for t, f in imported if f == "he.py"} == {"numpy", "tenseal"}
    assert os.access(b / "start.sh", os.X_OK)
    assert not list(b.rglob("__pycache__"))
    sources = [p.read_text() for p in (b / "edge").rglob("*.py")]
    assert (b / "edge" / "__main__.py").is_file() and len(sources) > 5
    for ours in ("coordinator", "devices", "edgeleak", "export", "attacks"):
        assert not any(f"from {ours}" in s or f"import {ours}" in s for s in sources), ours
    assert ModelArtifact.load(b / "model").manifest.sha256 == lenet_artifact.manifest.sha256
    # The bundle's own edge package resolves its settings from config.json.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edge.__main__ import settings; import edge; "
            "a = settings(['--config', 'config.json', '--id', 'pi-9']); "
            "print(a.broker, a.run, a.id, a.profile, a.data, edge.__file__)",
        ],
        cwd=b,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [
        "mqtt://10.0.0.5:1883",
        "r1",
        "pi-9",
        "rpi4",
        str(b / "data.npz"),
        str(b / "edge" / "__init__.py"),
    ]
    with pytest.raises(FileExistsError):
        build_bundle(b, model_dir=lenet_artifact.folder, runtime="onnx", profile="rpi4")
    with pytest.raises(ValueError, match="rpi4"):
        build_bundle(tmp_path / "c", model_dir=lenet_artifact.folder, runtime="onnx", profile="pi9")
    with pytest.raises(FileNotFoundError, match="pte"):
        build_bundle(
            tmp_path / "d", model_dir=lenet_artifact.folder, runtime="executorch", profile="rpi4"
        )


def test_ssh_urls_and_start_command() -> None:
    t = parse_ssh_url("ssh://pi@raspberrypi.local:2222/~/edgeleak")
    assert (t.user, t.host, t.port, t.path, t.remote_dir) == (
        "pi",
        "raspberrypi.local",
        2222,
        "~/edgeleak",
        "~/edgeleak",
    )
    t = parse_ssh_url("ssh://root@10.0.0.2/opt/edge leak")
    assert (t.port, t.path, t.remote_dir) == (22, "/opt/edge leak", "'/opt/edge leak'")
    with pytest.raises(ValueError, match="ssh://user@host"):
        parse_ssh_url("pi@raspberrypi.local:/home/pi")
    cmd = remote_start_command("/opt/b", args=["--id", "pi 1"], env={"EDGELEAK_WHEELS": "/w"})
    assert cmd == (
        "cd /opt/b && (env EDGELEAK_WHEELS=/w nohup ./start.sh --id 'pi 1' "
        "> device.log 2>&1 < /dev/null & echo $!)"
    )


# -- a real sshd on a loopback port ---------------------------------------------------------------


def _sshd_missing() -> str | None:
    if Path(SSHD).is_file():
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "openssh-server"],
            env=env,
            capture_output=True,
            timeout=300,
        )
        if Path(SSHD).is_file():
            return None
    return "sshd is not installed and could not be: apt-get install -y openssh-server"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """An sshd of our own on 127.0.0.1 with its own host key; yields (port, key, known_hosts)."""
    if why := _sshd_missing():
        pytest.skip(why)
    if not shutil.which("ssh"):
        pytest.skip("no ssh client: apt-get install -y openssh-client")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    shutil.copy(d / "client.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
    )
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        end = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if proc.poll() is not None or time.monotonic() > end:
                err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                pytest.fail(f"sshd did not start on port {port}: {err}")
            time.sleep(0.05)
        yield port, d / "client", d / "known_hosts"
    finally:
        proc.terminate()
        proc.wait(10)


def test_deploy_over_ssh_joins_a_round(
    sshd: tuple[int, Path, Path],
    mosquitto: BrokerAddress,
    lenet_artifact: ModelArtifact,
    tmp_path: Path,
) -> None:
    port, key, known = sshd
    run = "s" + uuid.uuid4().hex[:8]
    bundle = build_bundle(
        tmp_path / "bundle",
        model_dir=lenet_artifact.folder,
        runtime="onnx",
        profile="rpi4",
        data=_shard(tmp_path / "shard.npz", 100),
        broker=mosquitto.url,
        run=run,
    )
    remote = tmp_path / "remote" / "edgeleak"
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=60)
    with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord:
        dep = deploy_ssh(
            bundle,
            f"ssh://root@127.0.0.1:{port}{remote}",
            identity=key,
            ssh_options=[
                "-o",
                f"UserKnownHostsFile={known}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
            ],
            args=["--id", "pi-1", "--exit-on-end"],
            env={"EDGELEAK_PYTHON": sys.executable},
        )
        try:
            assert dep.pid > 0
            coord.wait_for_devices(1, 60)
            assert coord.online["pi-1"] == {
                "state": "online",
                "runtime": "onnx",
                "examples": 40,
                "profile": "rpi4",
            }
            res = coord.run_round(1)
            coord.end()
            end = time.monotonic() + 30
            while dep.running() and time.monotonic() < end:
                time.sleep(0.1)
            log = dep.log()
        finally:
            dep.stop()
    assert (res.selected, res.accepted) == (1, 1)
    assert (remote / "start.sh").is_file() and (remote / "model" / "manifest.json").is_file()
    assert f"edge from {remote / 'edge'}" in log, log
    assert f"device pi-1: run {run} ended after 1 updates" in log, log


# -- the Raspberry Pi stand-in: arm64 Debian under qemu-user ---------------------------------------


def _arm64_root() -> Path | None:
    root = os.environ.get("EDGELEAK_ARM64_ROOT")
    if root and (Path(root) / ".edgeleak-standin").is_file():
        return Path(root)
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    _arm64_root() is None,
    reason="no arm64 stand-in: build it with "
    "scripts/rpi_standin.sh and set EDGELEAK_ARM64_ROOT (minutes; CI does not)",
)
@pytest.mark.parametrize("secagg", ["", "k=0,t=0.5,clip=1,bits=16"], ids=["plain", "secagg"])
def test_bundle_runs_on_the_arm64_standin(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path, secagg: str
) -> None:
    """An arm64 device (a bundle under qemu-user) in a round with two x86 devices; with
    ``secagg`` it runs secure aggregation with them on its aarch64 ``cryptography`` wheel, and
    the masks cancel: the model moves by the mean of three clipped updates (|Δ| ≤ clip)."""
    root = _arm64_root()
    assert root is not None
    arch = subprocess.run(["chroot", str(root), "uname", "-m"], capture_output=True, text=True)
    assert arch.stdout.strip() == "aarch64"
    run = "r" + uuid.uuid4().hex[:8]
    inside = f"/tmp/edgeleak-{run}"
    build_bundle(
        root / inside.lstrip("/"),
        model_dir=lenet_artifact.folder,
        runtime="onnx",
        profile="rpi4",
        data=_shard(tmp_path / "shard.npz", 200),
        broker=mosquitto.url,
        run=run,
        device_id="pi-arm64",
    )
    # The chroot shares this host's network: the device reaches mosquitto on 127.0.0.1. A clean
    # environment, as on a Pi (none of this host's pip settings).
    pi = subprocess.Popen(
        [
            "chroot",
            str(root),
            "/usr/bin/env",
            "-i",
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "HOME=/root",
            "EDGELEAK_WHEELS=/wheels",
            f"{inside}/start.sh",
            "--exit-on-end",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    store = RunStore(tmp_path / "run.db")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=300, secagg=secagg)
    spec = fleet(run, mosquitto, lenet_artifact, contiguous_shards([40, 40]), tmp_path / "truth")
    try:
        with Coordinator(run, lenet_artifact, mosquitto, store, plan) as coord, Fleet(spec):
            t0 = time.monotonic()
            coord.wait_for_devices(3, 400)  # first start installs the wheels under emulation
            ready = time.monotonic() - t0
            assert coord.online["pi-arm64"]["profile"] == "rpi4"
            w0 = dict(coord.weights)
            res = coord.run_round(1)
            coord.end()
        out, _ = pi.communicate(timeout=120)
    finally:
        pi.kill()
        shutil.rmtree(root / inside.lstrip("/"), ignore_errors=True)
    print(
        f"\narm64 device online after {ready:.1f} s (venv + wheels installed); round 1: "
        f"{res.accepted}/{res.selected} accepted in {res.seconds:.2f} s"
    )
    print(out)
    assert pi.returncode == 0, out
    assert ", aarch64, " in out
    assert (res.selected, res.accepted, res.rejected) == (3, 3, 0)
    moved = max(float(np.abs(coord.weights[k] - w0[k]).max()) for k in w0)
    assert 0 < moved <= 1.0  # masks that did not cancel would decode to values up to 2^15
    if not secagg:
        assert "ended after 1 updates" in out
