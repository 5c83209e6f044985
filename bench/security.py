"""What secure mode costs: TLS + client certificates + ACL at the broker, Ed25519 signatures on
every task and update, against the plain (unauthenticated) mode measured in the same run.

Figures: bytes per update (MQTT packet, signed ÷ plain; and an estimate with TLS 1.3 record
framing, labelled so), TLS + MQTT handshake seconds per device (sequential connects until
CONNACK), coordinator seconds per verified update (signature check, next to the decode it
precedes), and round seconds of an emulated fleet (LeNet, FedAvg E=1 B=32, ``--examples`` per
device) at ``--devices`` sizes, plain and secure on their own mosquitto each. With
``bench/backdoor.py`` present, its ``backdoor_table()`` is added under ``"backdoor"``.

    python bench/security.py --json security.json [--devices 100 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import queue
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.fleet import DeviceSpec, Fleet, FleetSpec
from edge import sign, wire
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, connect, publish_packet_bytes
from edgeleak import pki
from edgeleak.broker import local_broker

TLS13_RECORD = 16384  # plaintext bytes per TLS record
TLS13_RECORD_OVERHEAD = 22  # 5-byte header + 1 content type + 16-byte AEAD tag


def tls_bytes(n: int) -> int:
    """Estimated bytes of ``n`` application bytes in TLS 1.3 records (no TCP/IP)."""
    return n + TLS13_RECORD_OVERHEAD * max(1, math.ceil(n / TLS13_RECORD))


def update_bytes(artifact: ModelArtifact, signer: sign.Signer) -> dict[str, float]:
    w = artifact.initial_params()
    up = wire.Update(run="bench", round=1, device=signer.identity, kind="delta", num_examples=60,
                     params=w)  # fmt: skip
    topic = wire.update_topic("bench", signer.identity)
    plain = publish_packet_bytes(topic, len(wire.encode_update(up)), QOS)
    signed = publish_packet_bytes(topic, len(wire.encode_update(up, signer=signer)), QOS)
    return {
        "plain": plain,
        "secure": signed,
        "ratio": signed / plain,
        "secure_with_tls_records_estimate": tls_bytes(signed),
        "ratio_with_tls_records_estimate": tls_bytes(signed) / plain,
    }


def verify_seconds(
    artifact: ModelArtifact, folder: Path, signer: sign.Signer, iters: int
) -> dict[str, float]:
    """Coordinator seconds per update: signature check, and the decode every update gets."""
    up = wire.Update(run="bench", round=1, device=signer.identity, kind="delta", num_examples=60,
                     params=artifact.initial_params())  # fmt: skip
    payload = wire.encode_update(up, signer=signer)
    v = sign.Verifier(folder)
    v.check(payload, signer.identity)  # loads the certificate once
    t0 = time.perf_counter()
    for _ in range(iters):
        v.check(payload, signer.identity)
    t_verify = (time.perf_counter() - t0) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        wire.decode_update(payload, artifact.manifest)
    t_decode = (time.perf_counter() - t0) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        wire.encode_update(up, signer=signer)
    t_sign = (time.perf_counter() - t0) / iters
    return {"verify": t_verify, "decode": t_decode, "device_sign_and_encode": t_sign}


def handshake_seconds(broker: BrokerAddress, ids: list[str]) -> float:
    """Mean seconds from connect() to CONNACK, one client after another."""
    total = 0.0
    for ident in ids:
        done: queue.Queue[object] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hs-{ident}", protocol=mqtt.MQTTv5)
        c.on_connect = lambda _c, _u, _f, rc, _p, q=done: q.put(rc)
        t0 = time.perf_counter()
        connect(c, broker, identity=ident)
        c.loop_start()
        rc = done.get(timeout=60)
        total += time.perf_counter() - t0
        c.disconnect()
        c.loop_stop()
        if getattr(rc, "is_failure", True):
            raise RuntimeError(f"{ident}: broker refused the connection ({rc})")
    return total / len(ids)


def fleet_round_seconds(
    artifact: ModelArtifact, broker: BrokerAddress, n: int, examples: int, rounds: int, workers: int
) -> dict[str, Any]:
    run = "sec" + uuid.uuid4().hex[:6]
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=32, deadline_s=600)
    creds = sign.Credentials.load(broker.pki, sign.COORDINATOR) if broker.pki else None
    devices = tuple(
        DeviceSpec(f"d{i:04d}", np.arange(i * examples, (i + 1) * examples) % 60000, "onnx", i)
        for i in range(n)
    )
    spec = FleetSpec(run, broker.secret_url, str(artifact.folder), "fashion-mnist", devices,
                     workers)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "run.db")
        t0 = time.perf_counter()
        with (
            Coordinator(run, artifact, broker, store, plan, credentials=creds) as coord,
            Fleet(spec),
        ):
            coord.wait_for_devices(n, 120 + n * 0.5)
            connect_s = time.perf_counter() - t0
            results = [coord.run_round(r) for r in range(1, rounds + 1)]
            coord.end()
        store.close()
    timed = results[1:] if len(results) > 1 else results  # round 1 pays for warm-up
    return {
        "seconds_per_round": float(np.mean([r.seconds for r in timed])),
        "fleet_online_seconds": round(connect_s, 2),
        "accepted": [r.accepted for r in results],
        "rejected": [r.rejected for r in results],
        "bytes_up_per_round": results[-1].bytes_up,
    }


def backdoor_rows() -> list[dict[str, Any]] | None:
    """``bench/backdoor.py``'s table, when that file exists (another part of the work)."""
    path = Path(__file__).with_name("backdoor.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("bench_backdoor", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.backdoor_table())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--examples", type=int, default=32, help="examples per device (default 32)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--handshakes", type=int, default=50, help="connects timed per mode")
    ap.add_argument("--iters", type=int, default=200, help="verifications timed")
    ap.add_argument("--no-backdoor", action="store_true", help="skip bench/backdoor.py's table")
    args = ap.parse_args()

    from export import export_model

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_model("lenet", Path(tmp) / "model", seed=0)
        folder = Path(tmp) / "pki"
        ids = [f"d{i:04d}" for i in range(max(max(args.devices), args.handshakes))]
        t0 = time.perf_counter()
        pki.ensure_fleet(folder, ids)
        out["enrol_seconds_per_device"] = (time.perf_counter() - t0) / len(ids)
        signer = sign.Signer.load(folder, "d0000")
        out["bytes_per_update"] = update_bytes(artifact, signer)
        out["coordinator_seconds_per_verified_update"] = verify_seconds(
            artifact, folder, signer, args.iters
        )
        print(json.dumps(out, indent=2), flush=True)
        hs: dict[str, float] = {}
        rows: dict[int, dict[str, Any]] = {n: {"devices": n} for n in args.devices}
        for mode, where in (("plain", None), ("secure", folder)):
            with local_broker("mosquitto", pki=where) as (broker, _):
                hs[mode] = handshake_seconds(broker, ids[: args.handshakes])
                for n in args.devices:
                    print(f"{mode}: {n} devices, {args.rounds} rounds ...", flush=True)
                    rows[n][mode] = fleet_round_seconds(
                        artifact, broker, n, args.examples, args.rounds, args.workers
                    )
        out["handshake_seconds_per_device"] = {**hs, "ratio": hs["secure"] / hs["plain"]}
        for r in rows.values():
            r["round_seconds_ratio"] = (
                r["secure"]["seconds_per_round"] / r["plain"]["seconds_per_round"]
            )
        out["rounds"] = list(rows.values())
    if not args.no_backdoor and (table := backdoor_rows()) is not None:
        out["backdoor"] = table
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
