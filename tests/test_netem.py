"""Real link shaping: devices in network namespaces, tc token buckets (and netem delay where the
kernel has it, else the delaying relay), bytes that take the time their profile says."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devices import netem
from devices.netem import (
    LinkShape,
    NetLab,
    link_shape,
    namespaces,
    tbf_burst,
    tc_commands,
    transfer_seconds,
)
from devices.profiles import load_profile
from edge.manifest import ModelArtifact
from edge.mqtt import QOS, BrokerAddress, Received, make_client, publish_packet_bytes, running
from tests.faultlab import LOSSY, lossy_link_run, rounds_in_lab

REPO = Path(__file__).resolve().parents[1]
WHY = netem.missing_tools()
needs_root = pytest.mark.skipif(WHY is not None, reason=f"link shaping: {WHY}")

# Runs inside a namespace: wait for one message on argv[2], report when it came, answer on argv[3]
# with argv[4] bytes and report when the answer left.
PROBE = """
import queue, sys, time
from edge.mqtt import QOS, make_client, parse_broker_url, running
inbox = queue.Queue(); ready = []
c = make_client("probe", inbox, subscriptions=(sys.argv[2],), on_ready=ready)
with running(c, parse_broker_url(sys.argv[1])):
    while not ready: time.sleep(0.01)
    print("ready", flush=True)
    m = inbox.get(timeout=60)
    print("got", m.t, len(m.payload), flush=True)
    t = time.monotonic()
    c.publish(sys.argv[3], b"u" * int(sys.argv[4]), qos=QOS).wait_for_publish(60)
    print("sent", t, flush=True)
"""


def test_link_shape_and_tc_commands() -> None:
    shape = link_shape(load_profile("phone-low"))
    assert shape == LinkShape(15.0, 5.0, 30.0)
    assert transfer_seconds(250_000, rate_mbps=2.0, delay_ms=50) == pytest.approx(1.05)
    (tbf,) = tc_commands("veth0", rate_mbps=2.0, delay_ms=50, netem=False)
    assert tbf[:8] == ["tc", "qdisc", "replace", "dev", "veth0", "root", "handle", "1:"]
    assert tbf[8:11] == ["tbf", "rate", "2000kbit"]
    delay, child = tc_commands("veth0", rate_mbps=2.0, delay_ms=50, netem=True)
    assert delay[8:11] == ["netem", "delay", "50ms"] and child[5:7] == ["parent", "1:1"]
    lossy, _ = tc_commands("veth0", rate_mbps=2.0, delay_ms=0, netem=True, loss=0.01)
    assert lossy[8:13] == ["netem", "delay", "0ms", "loss", "1%"]
    with pytest.raises(ValueError, match=r"loss=1.0: expected a fraction in \[0, 1\)"):
        LinkShape(1.0, 1.0, 0.0, loss=1.0)


@needs_root
def test_a_message_takes_bytes_over_rate_plus_delay(mosquitto: BrokerAddress) -> None:
    link = LinkShape(down_mbps=2.0, up_mbps=1.0, delay_ms=50.0)
    down_bytes, up_bytes = 250_000, 125_000
    t_in, t_out = "edgeleak/netem/in", "edgeleak/netem/out"
    inbox: queue.Queue[Received] = queue.Queue()
    host = make_client("netem-host", inbox, subscriptions=(t_out,))
    with NetLab([link], mosquitto) as lab, running(host, mosquitto):
        probe = subprocess.Popen(
            lab.argv(0, [sys.executable, "-c", PROBE, lab.broker_url, t_in, t_out, str(up_bytes)]),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert probe.stdout is not None
            assert probe.stdout.readline().split() == ["ready"]
            t0 = time.monotonic()
            host.publish(t_in, b"t" * down_bytes, qos=QOS)
            _, t_got, n = probe.stdout.readline().split()
            _, t_sent = probe.stdout.readline().split()
            reply = inbox.get(timeout=30)
            probe.wait(30)
        finally:
            probe.kill()
    assert int(n) == down_bytes and len(reply.payload) == up_bytes
    down = float(t_got) - t0
    up = reply.t - float(t_sent)
    # At least (bytes - token bucket depth) / rate + delay (TCP/IP headers only add to the
    # bytes); at most 25% + 0.15 s more.
    want_down = transfer_seconds(
        publish_packet_bytes(t_in, down_bytes) - tbf_burst(link.down_mbps),
        rate_mbps=link.down_mbps,
        delay_ms=link.delay_ms,
    )
    want_up = transfer_seconds(
        publish_packet_bytes(t_out, up_bytes) - tbf_burst(link.up_mbps),
        rate_mbps=link.up_mbps,
        delay_ms=link.delay_ms,
    )
    print(f"down {down:.3f} s (least {want_down:.3f}), up {up:.3f} s (least {want_up:.3f})")
    assert want_down <= down <= want_down * 1.25 + 0.15, (down, want_down)
    assert want_up <= up <= want_up * 1.25 + 0.15, (up, want_up)
    assert lab.names[0] not in namespaces()


@needs_root
def test_device_process_in_a_namespace_joins_a_round(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    link = link_shape(load_profile("phone-low"))
    lab = rounds_in_lab(mosquitto, lenet_artifact, tmp_path, link, rounds=1, deadline_s=60)
    (res,) = lab.results
    assert lab.returncode == 0, lab.output
    assert (res.selected, res.accepted) == (1, 1)
    least = transfer_seconds(
        res.bytes_down - tbf_burst(link.down_mbps), rate_mbps=link.down_mbps, delay_ms=link.delay_ms
    ) + transfer_seconds(
        res.bytes_up - tbf_burst(link.up_mbps), rate_mbps=link.up_mbps, delay_ms=link.delay_ms
    )
    assert res.seconds >= least, (res.seconds, least)


@needs_root
def test_a_device_behind_1pct_loss_and_300ms_rtt_finishes_its_rounds(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    row, lab = lossy_link_run(lenet_artifact, mosquitto, tmp_path, rounds=3)
    print(
        f"rounds {[round(r.seconds, 2) for r in lab.results]} s, dropped {lab.dropped}, "
        f"resent {lab.retransmitted}"
    )
    assert lab.returncode == 0, lab.output
    assert [(r.selected, r.accepted, r.rejected) for r in lab.results] == [(1, 1, 0)] * 3
    assert (row.rounds_completed, row.updates_sent, row.updates_accepted) == (3, 3, 3)
    assert (row.duplicates_aggregated, row.lost, row.rejected_by_reason) == (0, 0, {})
    # Packets were lost on the way, and the device's TCP resent them.
    assert lab.retransmitted > 0, lab.output
    assert lab.dropped is None or min(lab.dropped) > 0, lab.dropped
    # Each round took at least the 300 ms RTT per exchange (task out, update in).
    assert all(r.seconds >= 2 * LOSSY.delay_ms / 1e3 for r in lab.results)


@needs_root
def test_namespaces_are_removed_even_on_failure(
    mosquitto: BrokerAddress, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = namespaces()
    links = [LinkShape(10, 5, 10), LinkShape(10, 5, 10)]
    with pytest.raises(RuntimeError, match="boom"), NetLab(links, mosquitto) as lab:
        made = list(lab.names)
        assert set(made) <= set(namespaces())
        raise RuntimeError("boom")
    assert namespaces() == before
    links_after = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"elbr{lab.tag}" not in links_after and f"elh{lab.tag}" not in links_after
    # A failure half-way through building (the second device's tc) also leaves nothing behind.
    real = netem.tc_commands
    calls: list[str] = []

    def failing(dev: str, **kw: float | bool) -> list[list[str]]:
        calls.append(dev)
        if len(calls) == 3:
            return [["tc", "qdisc", "replace", "dev", dev, "root", "no-such-qdisc"]]
        return real(dev, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(netem, "tc_commands", failing)
    with pytest.raises(RuntimeError, match="no-such-qdisc"):
        with NetLab(links, mosquitto):
            pass
    assert len(calls) == 3 and namespaces() == before
