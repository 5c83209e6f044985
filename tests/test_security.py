"""Secure mode: enrolment, a real mosquitto with TLS + ACL, signed tasks and updates."""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RoundResult, RunStore
from devices.fleet import Fleet
from edge import sign, wire
from edge.backends import load_backend
from edge.codec import read_container
from edge.device import Device
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, Received, parse_broker_url, wait_until, with_pki
from edgeleak import pki
from edgeleak.broker import local_broker
from edgeleak.errors import UsageError
from tests.fedutil import contiguous_shards, fleet

DEVICES = ("d0000", "d0001")


def _run_id() -> str:
    return "s" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with the coordinator, two fleet devices, a spy device and a revoked one."""
    d = tmp_path_factory.mktemp("pki") / "ca"
    pki.ensure_fleet(d, [*DEVICES, "spy", "gone"])
    pki.revoke(d, "gone")
    return d


@pytest.fixture(scope="module")
def secure_broker(pki_dir: Path) -> Iterator[BrokerAddress]:
    with local_broker("mosquitto", pki=pki_dir) as (addr, _):
        yield addr


def _update(
    run: str, device: str, round_: int, artifact: ModelArtifact, **kw: object
) -> wire.Update:
    params = {s.name: np.zeros(s.shape, np.float32) for s in artifact.manifest.params}
    return wire.Update(run=run, round=round_, device=device, kind="delta", num_examples=8,
                       params=params, **kw)  # type: ignore[arg-type]  # fmt: skip


class Client:
    """A paho client over TLS with ``identity``'s certificate (None: no certificate at all)."""

    def __init__(self, broker: BrokerAddress, pki_dir: Path, identity: str | None) -> None:
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.result: queue.Queue[str] = queue.Queue()
        self.granted: queue.Queue[list[int]] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"x-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)  # fmt: skip
        if identity is None:
            ctx = ssl.create_default_context(cafile=str(pki_dir / sign.CA_CERT))
        else:
            ctx = sign.tls_context(pki_dir, identity)
        self.c.tls_set_context(ctx)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self.result.put(str(rc))
        self.c.on_disconnect = lambda _c, _u, _f, rc, _p: self.result.put(f"disconnect {rc}")
        self.c.on_message = lambda _c, _u, m: self.inbox.put(m)
        self.c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.granted.put([r.value for r in rcs])
        try:
            self.c.connect(broker.host, broker.port)
        except (OSError, ssl.SSLError) as e:
            self.result.put(f"refused {e}")
            return
        self.c.loop_start()

    def outcome(self) -> str:
        return self.result.get(timeout=30)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# -- enrolment ----------------------------------------------------------------------------------


def test_enrolment_refuses_topic_characters_and_reserved_roles(tmp_path: Path) -> None:
    d = pki.init(tmp_path / "ca")
    for bad in ("a/b", "a+b", "a#b", "", ".hidden"):
        with pytest.raises(UsageError, match="identity"):
            pki.enroll(d, bad)
    with pytest.raises(UsageError, match="reserved"):
        pki.enroll(d, "coordinator")
    with pytest.raises(UsageError, match="--role"):
        pki.enroll(d, "x", role="admin")
    pki.enroll(d, "agg1", role="aggregator")
    with pytest.raises(UsageError, match="already enrolled"):
        pki.enroll(d, "agg1", role="aggregator")
    with pytest.raises(UsageError, match="pki init"):
        pki.enroll(tmp_path / "nothing", "x")
    with pytest.raises(UsageError, match="new or empty"):
        pki.init(d)
    assert (d / "identities" / "agg1.key").stat().st_mode & 0o777 == 0o600


def test_signed_message_verifies_and_every_tampering_is_a_counted_reason(
    pki_dir: Path, lenet_artifact: ModelArtifact
) -> None:
    v = sign.Verifier(pki_dir)
    d0 = sign.Signer.load(pki_dir, "d0000")
    up = _update("r", "d0000", 1, lenet_artifact)
    signed = wire.encode_update(up, signer=d0)
    plain = wire.encode_update(up)
    v.check(signed, "d0000")
    # The signature adds its tensor entry, the signer field and 64 bytes; the rest decodes alike.
    got = wire.decode_update(signed, lenet_artifact.manifest)
    assert got.device == "d0000" and set(got.params) == set(up.params)
    tensors, meta = read_container(signed)
    assert meta["signer"] == "d0000" and tensors["__sig__"].shape == (64,)
    assert bytes(tensors["__sig__"]) == signed[-64:]
    assert "signer" not in read_container(plain)[1]

    def reason(buf: bytes, signer: str = "d0000", role: str | None = None) -> str:
        with pytest.raises(wire.WireError) as e:
            v.check(buf, signer, role)
        return e.value.reason

    flipped = bytearray(signed)
    flipped[len(signed) // 2] ^= 1  # one bit of a tensor
    assert reason(bytes(flipped)) == "bad_signature"
    assert reason(plain) == "bad_signature"  # unsigned
    assert reason(signed, "d0001") == "bad_signature"  # names d0000 as its signer
    forged = wire.encode_update(_update("r", "d0001", 1, lenet_artifact), signer=d0)
    forged = forged.replace(b'"signer":"d0000"', b'"signer":"d0001"')
    assert reason(forged, "d0001") == "bad_signature"  # d0000's key, d0001's name
    ghost = wire.encode_update(_update("r", "ghost", 1, lenet_artifact), signer=d0)
    assert reason(ghost.replace(b'"signer":"d0000"', b'"signer":"ghost"'), "ghost") == (
        "unknown_device"
    )
    gone = sign.Signer.load(pki_dir, "gone")
    assert reason(wire.encode_update(up, signer=gone), "gone") == "revoked"
    # A task must come from the coordinator's identity, enrolled as the coordinator.
    task = wire.Task(run="r", round=1, device="d0000", algorithm="fedavg", lr=0.1, epochs=1,
                     batch_size=8, model_hash="m", weights=up.params)  # fmt: skip
    assert reason(wire.encode_task(task, signer=d0), "d0000", "coordinator") == "unknown_device"
    coord = sign.Signer.load(pki_dir, "coordinator")
    v.check(wire.encode_task(task, signer=coord), "coordinator", "coordinator")


def test_revocation_takes_effect_on_the_next_message(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    pki.ensure_fleet(d, ["a", "b"])
    v = sign.Verifier(d)
    v.admit("a")
    pki.revoke(d, "a")
    with pytest.raises(wire.WireError, match="revoked"):
        v.admit("a")
    v.admit("b")
    with pytest.raises(UsageError, match="revoked"):
        pki.enroll(d, "a")


# -- the broker ---------------------------------------------------------------------------------


def test_outsider_without_certificate_and_revoked_device_cannot_connect(
    secure_broker: BrokerAddress, pki_dir: Path
) -> None:
    for who in (None, "gone"):
        c = Client(secure_broker, pki_dir, who)
        try:
            assert c.outcome() != "Success", who
        finally:
            c.close()
    ok = Client(secure_broker, pki_dir, "spy")
    try:
        assert ok.outcome() == "Success"
    finally:
        ok.close()


def test_secure_round_acl_and_signatures(
    secure_broker: BrokerAddress,
    pki_dir: Path,
    lenet_artifact: ModelArtifact,
    tmp_path: Path,
) -> None:
    run = _run_id()
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=8, deadline_s=60)
    store = RunStore(tmp_path / "run.db")
    creds = sign.Credentials.load(pki_dir, "coordinator")
    spec = fleet(run, secure_broker, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "t")
    assert "pki=" in spec.broker_url and spec.broker_url.startswith("mqtts://")
    spy = Client(secure_broker, pki_dir, "spy")
    assert spy.outcome() == "Success"
    # A device's certificate may subscribe to anything (mosquitto 2.0 grants it), but the ACL
    # is applied on delivery: it reads no one's updates or tasks.
    spy.c.subscribe([(f"edgeleak/{run}/update/#", QOS), (f"edgeleak/{run}/task/#", QOS)])
    spy.granted.get(timeout=30)
    coord = Coordinator(run, lenet_artifact, secure_broker, store, plan, credentials=creds)
    with coord, Fleet(spec):
        coord.wait_for_devices(2, 60)
        w0 = dict(coord.weights)
        res = coord.run_round(1)
        # The spy publishes an update on d0000's topic: the broker disconnects it for that.
        forged = wire.encode_update(
            _update(run, "d0000", 2, lenet_artifact), signer=sign.Signer.load(pki_dir, "spy")
        )
        spy.c.publish(wire.update_topic(run, "d0000"), forged, qos=QOS)
        assert spy.outcome().startswith("disconnect")
        spy.close()
        assert spy.inbox.qsize() == 0  # no task, no update, no control of the run reached it
        # Back with the same certificate, it publishes on its own topic naming d0000 in the
        # metadata (the coordinator rejects it), then its status: per-client ordering means
        # the coordinator has seen the update once it sees the status.
        spy = Client(secure_broker, pki_dir, "spy")
        assert spy.outcome() == "Success"
        spy.c.publish(wire.update_topic(run, "spy"), forged, qos=QOS).wait_for_publish(30)
        online = json.dumps({"state": "online", "examples": 8}).encode()
        spy.c.publish(wire.status_topic(run, "spy"), online, qos=QOS).wait_for_publish(30)
        wait_until(lambda: "spy" in coord.standing or coord.poll(0.05), 30, "the spy's status")
        coord.end()
    spy.close()
    assert (res.selected, res.accepted, res.rejected) == (2, 2, 0)
    assert any(np.abs(coord.weights[k] - w0[k]).max() > 0 for k in w0)
    rows = store.db.execute(
        "SELECT device, topic, reason FROM rejections WHERE run=?", (run,)
    ).fetchall()
    assert rows == [("spy", wire.update_topic(run, "spy"), "device_mismatch")]
    assert store.ledger_bytes(run, direction="up", kinds=("update",)) == res.bytes_up


def test_signed_nan_update_ends_its_devices_wait(
    secure_broker: BrokerAddress,
    pki_dir: Path,
    lenet_artifact: ModelArtifact,
    tmp_path: Path,
) -> None:
    """A signed update with NaN is the device's own (its training diverged): the round stops
    waiting for that device at once. Unsigned, it waits on (``test_rounds``)."""
    run = _run_id()
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=8, deadline_s=600)
    store = RunStore(tmp_path / "run.db")
    creds = sign.Credentials.load(pki_dir, "coordinator")
    spec = fleet(run, secure_broker, lenet_artifact, contiguous_shards([8, 8]), tmp_path / "t")
    spy = Client(secure_broker, pki_dir, "spy")
    assert spy.outcome() == "Success"
    spy.c.subscribe(wire.task_topic(run, "spy"), QOS)
    spy.granted.get(timeout=30)
    result: list[RoundResult] = []
    coord = Coordinator(run, lenet_artifact, secure_broker, store, plan, credentials=creds)
    with coord, Fleet(spec):
        online = json.dumps({"state": "online", "examples": 8}).encode()
        spy.c.publish(wire.status_topic(run, "spy"), online, qos=QOS).wait_for_publish(30)
        coord.wait_for_devices(3, 60)
        t = threading.Thread(target=lambda: result.append(coord.run_round(1)))
        t.start()
        spy.inbox.get(timeout=120)  # its task: the round is on
        nan = _update(run, "spy", 1, lenet_artifact)
        next(iter(nan.params.values())).flat[0] = np.nan
        signed = wire.encode_update(nan, signer=sign.Signer.load(pki_dir, "spy"))
        spy.c.publish(wire.update_topic(run, "spy"), signed, qos=QOS).wait_for_publish(30)
        t.join(300)  # a round that waited for the spy would hold until its 600 s deadline
        coord.end()
    spy.close()
    assert result, "the round kept waiting for a device whose signed update was NaN"
    assert (result[0].selected, result[0].accepted) == (3, 2)
    assert store.rejection_counts(run) == {"non_finite": 1}


def test_revoked_device_is_refused_by_the_coordinator(
    secure_broker: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """Revoked after the broker started (which reads the CRL only then): the coordinator still
    refuses the device's status, so it is never selected."""
    run = _run_id()
    # A second CA would not pass the broker: revoke in the broker's own PKI, on a fresh id.
    assert secure_broker.pki is not None
    own = Path(secure_broker.pki)
    late = f"late{uuid.uuid4().hex[:6]}"
    pki.enroll(own, late)
    c = Client(secure_broker, own, late)
    assert c.outcome() == "Success"
    pki.revoke(own, late)
    store = RunStore(tmp_path / "run.db")
    creds = sign.Credentials.load(own, "coordinator")
    with Coordinator(
        run, lenet_artifact, secure_broker, store, RoundPlan(), credentials=creds
    ) as co:
        online = json.dumps({"state": "online", "examples": 8}).encode()
        c.c.publish(wire.status_topic(run, late), online, qos=QOS).wait_for_publish(30)
        wait_until(lambda: bool(store.rejection_counts(run)) or co.poll(0.05), 30, "the rejection")
        assert late not in co.standing
    c.close()
    assert store.rejection_counts(run) == {"revoked": 1}


def test_device_refuses_forged_tasks_and_trains_on_nothing(
    pki_dir: Path, lenet_artifact: ModelArtifact, caplog: pytest.LogCaptureFixture
) -> None:
    creds = sign.Credentials.load(pki_dir, "d0000")
    x = np.zeros((8, *lenet_artifact.manifest.input_shape), np.float32)
    dev = Device("d0000", "r", lenet_artifact, load_backend("onnx", lenet_artifact), x,
                 np.zeros(8, np.int64), credentials=creds)  # fmt: skip
    task = wire.Task(run="r", round=1, device="d0000", algorithm="fedavg", lr=0.1, epochs=1,
                     batch_size=8, model_hash=lenet_artifact.manifest.sha256,
                     weights=lenet_artifact.initial_params())  # fmt: skip
    topic = wire.task_topic("r", "d0000")

    def deliver(payload: bytes) -> list[object]:
        return list(dev.handle(Received(topic, payload, False, time.monotonic())))

    with caplog.at_level(logging.WARNING, logger="edge.device"):
        assert deliver(wire.encode_task(task)) == []  # unsigned
        assert deliver(wire.encode_task(task, signer=sign.Signer.load(pki_dir, "spy"))) == []
    assert dev.rejected == {"bad_signature": 2}
    assert dev.rounds_done == 0
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(": ", 2)[2] for line in lines] == [
        "unsigned message (no __sig__ tensor or signer)",
        "signed by 'spy', expected a coordinator or aggregator",
    ]
    genuine = wire.encode_task(task, signer=sign.Signer.load(pki_dir, "coordinator"))
    (out,) = deliver(genuine)
    assert dev.rounds_done == 1
    sign.Verifier(pki_dir).check(out.payload, "d0000")  # type: ignore[attr-defined]
    assert deliver(genuine) == []  # a replay stays refused by its nonce
    assert dev.rejected["replayed_nonce"] == 1


def test_broker_urls_carry_tls_and_pki() -> None:
    b = parse_broker_url("mqtts://10.0.0.2")
    assert (b.tls, b.port, b.pki) == (True, 8883, None)
    b = with_pki(b, "/x/ca")
    assert parse_broker_url(b.secret_url) == b
    assert b.url == "mqtts://10.0.0.2:8883?pki=/x/ca"
    with pytest.raises(ValueError, match="mqtts"):
        with_pki(parse_broker_url("mqtt://h:1"), "/x")
    with pytest.raises(ValueError, match="--pki"):
        with_pki(parse_broker_url("mqtts://h:1"), None)
    assert with_pki(parse_broker_url("mqtt://h:1"), None).tls is False


def test_pki_cli_and_bundle_carry_credentials(
    tmp_path: Path, lenet_artifact: ModelArtifact, capsys: pytest.CaptureFixture[str]
) -> None:
    from devices.deploy import build_bundle
    from edgeleak.cli import main

    ca = tmp_path / "ca"
    assert main(["pki", "init", str(ca), "--host", "pi.lan"]) == 0
    assert main(["pki", "enroll", str(ca), "--device", "a+b"]) == 2
    assert "without '/', '+', '#'" in capsys.readouterr().err
    agg = ["pki", "enroll", str(ca), "--device", "gw", "--role", "aggregator", "--group"]
    assert main([*agg, "run1"]) == 2  # a bad group run: nothing is enrolled
    assert "expected RUN.GROUP" in capsys.readouterr().err
    assert not sign.cert_path(ca, "gw").exists()
    assert main([*agg, "run1.g0"]) == 0 and main([*agg, "run2.g0"]) == 0  # enrolled, then added
    assert (ca / "groups" / "gw").read_text() == "run1.g0\nrun2.g0\n"
    acl = pki.acl_text(ca)
    assert "user gw\ntopic write edgeleak/run1.g0/task/+\n" in acl
    assert "topic read edgeleak/run2.g0/status/+\n" in acl
    assert main(["pki", "enroll", str(ca), "--device", "coordinator", "--role", "coordinator"]) == 0
    assert main(["pki", "enroll", str(ca), "--device", "pi-7"]) == 0
    assert main(["broker", "--secure", "--port", "18999"]) == 2
    out = build_bundle(tmp_path / "b", model_dir=lenet_artifact.folder, runtime="onnx",
                       profile="", device_id="pi-7", broker="mqtts://pi.lan", pki=ca)  # fmt: skip
    files = sorted(str(p.relative_to(out / "pki")) for p in (out / "pki").rglob("*.*"))
    assert files == ["ca.crt", "crl.pem", "identities/coordinator.crt", "identities/pi-7.crt",
                     "identities/pi-7.key"]  # fmt: skip
    assert json.loads((out / "config.json").read_text())["pki"] == "pki"
    assert "cryptography>=42" in (out / "requirements.txt").read_text()
    sign.Credentials.load(out / "pki", "pi-7")  # what the device loads at start
    with pytest.raises(ValueError, match="pki enroll"):
        build_bundle(tmp_path / "c", model_dir=lenet_artifact.folder, runtime="onnx", profile="",
                     device_id="pi-8", pki=ca)  # fmt: skip
    assert main(["pki", "revoke", str(ca), "--device", "pi-7"]) == 0
    with pytest.raises(wire.WireError, match="revoked"):
        sign.Verifier(ca).admit("pi-7")


def test_device_process_with_pki_joins_a_secure_round(
    secure_broker: BrokerAddress, pki_dir: Path, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """`edgeleak device --broker mqtts://... --pki DIR`: TLS, a signed task in, a signed update out."""
    import subprocess

    from devices.datasets import load_dataset
    from edge.data import save_shard
    from tests.fedutil import device_argv

    run = _run_id()
    data = load_dataset("fashion-mnist")
    save_shard(tmp_path / "shard.npz", data.x_train[:16], data.y_train[:16])
    url = f"mqtts://127.0.0.1:{secure_broker.port}"
    argv = device_argv(url, tmp_path / "shard.npz", lenet_artifact, run, "d0001", "--pki",
                       str(pki_dir), "--exit-on-end")  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store = RunStore(tmp_path / "run.db")
    creds = sign.Credentials.load(pki_dir, "coordinator")
    plan = RoundPlan(algorithm="fedavg", lr=0.05, batch_size=8, deadline_s=60)
    try:
        with Coordinator(run, lenet_artifact, secure_broker, store, plan, credentials=creds) as co:
            co.wait_for_devices(1, 120)
            res = co.run_round(1)
            co.end()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert (res.selected, res.accepted, res.rejected) == (1, 1, 0)
    assert f"device d0001: run {run} round 1: 16 examples, loss " in out
    assert "refused tasks: none" in out


# -- key holder and edge aggregators in secure mode ----------------------------------------------


def test_acl_gives_keyholder_and_aggregators_their_topics_only(tmp_path: Path) -> None:
    """The broker's ACL from the PKI: the key holder alone (besides the coordinator) publishes
    HE keys and results; an aggregator tasks and reads the devices of its group run, and no
    other run's; devices read the public key."""
    d = tmp_path / "ca"
    pki.ensure_fleet(d, ["d0000", "d0001"], keyholder="keyholder", groups={"agg-g0": "ra.g0"})
    with local_broker("mosquitto", pki=d) as (broker, _):
        agg, dev, kh = (Client(broker, d, who) for who in ("agg-g0", "d0000", "keyholder"))
        assert [c.outcome() for c in (agg, dev, kh)] == ["Success"] * 3
        agg.c.subscribe([("edgeleak/ra.g0/update/+", QOS), ("edgeleak/rb.g0/update/+", QOS),
                         ("edgeleak/ra/update/+", QOS), ("edgeleak/ra/he/result", QOS)])  # fmt: skip
        dev.c.subscribe([("edgeleak/ra.g0/task/d0000", QOS), ("edgeleak/rb.g0/task/d0000", QOS),
                         ("edgeleak/ra/he/public", QOS)])  # fmt: skip
        agg.granted.get(timeout=30)
        dev.granted.get(timeout=30)
        kh.c.publish("edgeleak/ra/he/public", b"pk", qos=QOS, retain=True).wait_for_publish(30)
        for t in ("edgeleak/ra.g0/update/d0000", "edgeleak/rb.g0/update/d0000",
                  "edgeleak/ra/update/d0000"):  # fmt: skip
            dev.c.publish(t, t.encode(), qos=QOS).wait_for_publish(30)
        agg.c.publish("edgeleak/ra.g0/task/d0000", b"task", qos=QOS).wait_for_publish(30)
        got = [agg.inbox.get(timeout=30).topic, dev.inbox.get(timeout=30).topic]
        got.append(dev.inbox.get(timeout=30).topic)
        assert sorted(got) == ["edgeleak/ra.g0/task/d0000", "edgeleak/ra.g0/update/d0000",
                               "edgeleak/ra/he/public"]  # fmt: skip
        # outside its group the aggregator's publish costs it the connection, and reaches no one
        agg.c.publish("edgeleak/rb.g0/task/d0000", b"task", qos=QOS)
        assert agg.outcome().startswith("disconnect")
        # a device may not publish a decrypted "result" (only the key holder and coordinator)
        dev.c.publish("edgeleak/ra/he/result", b"forged", qos=QOS)
        assert dev.outcome().startswith("disconnect")
        time.sleep(0.5)
        assert agg.inbox.qsize() == 0 and dev.inbox.qsize() == 0
        for c in (agg, dev, kh):
            c.close()
    acl = pki.acl_text(d)
    assert "user keyholder\n" in acl and "user agg-g0\ntopic write edgeleak/ra.g0/task/+\n" in acl
    with pytest.raises(UsageError, match="not enrolled in .* as an aggregator"):
        pki.serve_group(d, "d0000", "ra.g1")
    with pytest.raises(UsageError, match="expected RUN.GROUP"):
        pki.serve_group(d, "agg-g0", "ra")


def test_device_takes_tasks_signed_by_its_aggregator_and_aggregator_checks_signatures(
    pki_dir: Path, lenet_artifact: ModelArtifact
) -> None:
    from edge.aggregator import EdgeAggregator

    ca = pki_dir.parent / "agg-ca"
    if not ca.exists():
        pki.ensure_fleet(ca, ["d0000", "d0001"], groups={"agg-g0": "r.g0"})
    coordinator = sign.Signer.load(ca, "coordinator")
    agg = EdgeAggregator("agg-g0", "r", "g0", ["d0000"], lenet_artifact,
                         credentials=sign.Credentials.load(ca, "agg-g0"))  # fmt: skip
    task = wire.Task(run="r", round=1, device="agg-g0", algorithm="fedavg", lr=0.1, epochs=1,
                     batch_size=8, model_hash=lenet_artifact.manifest.sha256,
                     weights=lenet_artifact.initial_params())  # fmt: skip
    topic = wire.task_topic("r", "agg-g0")
    now = time.monotonic()
    assert agg.handle(Received(topic, wire.encode_task(task), False, now)) == []
    forged = wire.encode_task(task, signer=sign.Signer.load(ca, "d0001"))
    assert agg.handle(Received(topic, forged, False, now)) == []
    assert agg.rejected == {"bad_signature": 2}
    (relayed,) = agg.handle(Received(topic, wire.encode_task(task, signer=coordinator), False, now))
    assert relayed.topic == "edgeleak/r.g0/task/d0000"
    assert sign.signed_part(relayed.payload)[2] == "agg-g0"
    x = np.zeros((8, *lenet_artifact.manifest.input_shape), np.float32)
    dev = Device("d0000", "r.g0", lenet_artifact, load_backend("onnx", lenet_artifact), x,
                 np.zeros(8, np.int64), credentials=sign.Credentials.load(ca, "d0000"))  # fmt: skip
    (update,) = dev.handle(Received(relayed.topic, relayed.payload, False, now))
    # an update signed by another device than its topic's is refused; the genuine one is taken
    other = wire.encode_update(
        _update("r.g0", "d0000", 1, lenet_artifact), signer=sign.Signer.load(ca, "d0001")
    )
    agg.handle(Received("edgeleak/r.g0/update/d0000", other, False, now))
    assert agg.rejected == {"bad_signature": 3}
    agg.announced["d0000"] = 8
    (up,) = agg.handle(Received(update.topic, update.payload, False, now))  # type: ignore[attr-defined]
    assert up.topic == "edgeleak/r/update/agg-g0"
    sign.Verifier(ca).check(up.payload, "agg-g0", role="aggregator")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, kinds",
    [
        (["--secagg", "k=0", "--devices", "3"], {"secagg_masked": 3}),
        (["--he", "--devices", "3"], {"update": 3}),
        (["--aggregators", "2", "--devices", "4"], {"aggregate": 2, "group_up": 2}),
    ],
    ids=["secagg", "he", "aggregators"],
)
def test_secure_demo_with_server_side_protections(
    tmp_path: Path, flags: list[str], kinds: dict[str, int]
) -> None:
    """`edgeleak demo --secure` with each server-side protection: every identity enrolled
    (key holder, aggregators with their group runs), TLS + ACL + signatures, every round whole."""
    import sqlite3
    import subprocess
    import sys

    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", "demo", "--secure", "--rounds", "1", "--out",
         str(out), "--seed", "3", *flags],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sqlite3.connect(out / "run.db")
    (selected, accepted, rejected) = db.execute(
        "SELECT selected, accepted, rejected FROM rounds WHERE round=1"
    ).fetchone()
    assert selected == accepted > 0 and rejected == 0
    counts = dict(db.execute("SELECT kind, COUNT(*) FROM messages GROUP BY kind").fetchall())
    assert {k: counts.get(k) for k in kinds} == kinds
    s = json.loads((out / "summary.json").read_text())
    assert s["bytes_up"] == sum(r["bytes_up"] for r in s["rounds"]) > 0
    roles = {p.stem: pki.role(out / "pki", p.stem) for p in (out / "pki/identities").glob("*.crt")}
    if "--he" in flags:
        assert roles["keyholder"] == "keyholder"
    if "--aggregators" in flags:
        assert roles["agg-g0"] == roles["agg-g1"] == "aggregator"
        assert (out / "pki/groups/agg-g1").read_text() == f"{s['run']}.g1\n"
