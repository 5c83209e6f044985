"""Two "machines" on this one: network namespaces, each with a Ray node and a site broker bridged
to the coordinator's broker (README: Beyond one machine)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from coordinator.server import Coordinator, RoundPlan, RoundResult
from coordinator.store import RunStore
from devices.fleet import Fleet, FleetSpec
from devices.netem import LinkShape, NetLab, missing_tools, set_link
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edge.wire import Params
from edgeleak.broker import bridge_conf, free_port, local_broker, mosquitto_conf, mosquitto_path
from tests.fedutil import contiguous_shards, fleet

PER_SITE = 500
FAST = LinkShape(down_mbps=10_000, up_mbps=10_000, delay_ms=0)  # an unshaped LAN
RAY = str(Path(sys.executable).with_name("ray"))
# Ray without its token authentication on the namespaces' private bridge, for every node and
# the driver alike (README: Beyond one machine)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _why_not() -> str | None:
    if (why := missing_tools()) is not None:
        return why
    if mosquitto_path() is None:
        return "needs mosquitto"
    if not Path(RAY).exists():
        return "needs Ray: pip install 'edgeleak[ray]'"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stdout[-2000:]} {res.stderr[-2000:]}"


@contextmanager
def _site_broker(lab: NetLab, i: int, upstream: str, tmp: Path) -> Iterator[BrokerAddress]:
    """mosquitto in namespace ``i`` on its loopback, bridged to ``upstream`` (HOST:PORT)."""
    port = 1883
    conf = tmp / f"site{i}.conf"
    conf.write_text(mosquitto_conf(port, bridge=bridge_conf(f"s{i}", upstream)))
    proc = subprocess.Popen(lab.argv(i, [str(mosquitto_path()), "-c", str(conf)]))
    try:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
        for _ in range(100):
            if subprocess.run(lab.argv(i, [sys.executable, "-c", probe])).returncode == 0:
                break
            time.sleep(0.1)
        yield BrokerAddress("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def _ray_cluster(lab: NetLab, sites: int) -> Iterator[str]:
    """A Ray head here (no CPUs: no actor runs on it) and one 1-CPU node per namespace."""
    head = f"{lab.host_ip}:{free_port()}"
    env = {**os.environ, **RAY_ENV}
    try:
        _run(
            [RAY, "start", "--head", f"--node-ip-address={lab.host_ip}",
             f"--port={head.rpartition(':')[2]}", "--num-cpus=0", "--include-dashboard=false"],
            env,
        )  # fmt: skip
        for i in range(sites):
            _run(
                lab.argv(i, [RAY, "start", f"--address={head}",
                             f"--node-ip-address={lab.device_ip(i)}", "--num-cpus=1"]),
                env,
            )  # fmt: skip
        yield head
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_two_sites_on_ray_nodes_behind_bridges_train_the_one_site_models(
    lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    """2 × 500 devices, each half on a Ray node in its own namespace and on that namespace's
    site broker, give the models of 1 × 1,000 devices on one broker with the same seed; then
    one namespace's link is cut in the middle of the run: its devices are that round's dropouts
    and the run goes on with the other site."""
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=60)
    n = 2 * PER_SITE

    run = "n" + uuid.uuid4().hex[:8]
    with local_broker("mosquitto") as (alone, _):
        spec = fleet(run, alone, lenet_artifact, contiguous_shards([8] * n), tmp_path / "t1")
        with Coordinator(run, lenet_artifact, alone, RunStore(tmp_path / "one.db"), plan,
                         seed=7) as coord, Fleet(spec):  # fmt: skip
            coord.wait_for_devices(n, 300)
            one_site = [coord.run_round(r) for r in (1, 2)]
            coord.end()

    run = "n" + uuid.uuid4().hex[:8]
    shards = contiguous_shards([8] * n)
    with (
        local_broker("mosquitto") as (central, _),
        NetLab([FAST, FAST], central) as lab,
        _ray_cluster(lab, 2) as head,
    ):
        upstream = f"{lab.host_ip}:{lab.relay.address[1]}"  # type: ignore[union-attr]
        with (
            _site_broker(lab, 0, upstream, tmp_path) as site0,
            _site_broker(lab, 1, upstream, tmp_path) as site1,
        ):
            halves = [
                dataclasses.replace(
                    fleet(
                        run,
                        site,
                        lenet_artifact,
                        shards[i * PER_SITE : (i + 1) * PER_SITE],
                        tmp_path / f"t2-{i}",
                    ),
                    site=f"site{i}",
                )  # fmt: skip
                for i, site in enumerate((site0, site1))
            ]
            nodes = [lab.device_ip(0), lab.device_ip(1)]
            # The driver in a fresh process: this one may hold another Ray cluster's state.
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as driver:
                two_sites = driver.submit(
                    _two_sites,
                    head, lab.host_ip, nodes, halves, central, tmp_path / "two.db", lab.link(0),
                ).result()  # fmt: skip
    store = RunStore(tmp_path / "two.db")
    assert [(r.selected, r.accepted) for r in one_site] == [(n, n)] * 2
    assert [(r.selected, r.accepted) for r in two_sites[:2]] == [(n, n)] * 2
    assert [r.model_sha256 for r in two_sites[:2]] == [r.model_sha256 for r in one_site]
    # Round 3: the link of site 0 went down as the round started.
    assert (two_sites[2].selected, two_sites[2].accepted) == (n, PER_SITE)
    dropped = {d for d, in store.db.execute(
        "SELECT device FROM dropouts WHERE run=? AND round=3", (run,))}  # fmt: skip
    assert dropped == {f"d{i:04d}" for i in range(PER_SITE)}
    # Round 4: the silent site is not selected; the other trains on.
    assert (two_sites[3].selected, two_sites[3].accepted) == (PER_SITE, PER_SITE)
    # The ledger per hop: each site's bridge carried its own half of the tasks and updates.
    bridge = {(site, r, d): b for site, r, d, b in store.db.execute(
        "SELECT s.site, m.round, m.direction, SUM(m.bytes) FROM messages m JOIN sites s "
        "ON m.run = s.run AND m.device = s.device WHERE m.run=? AND m.kind='bridge' "
        "AND m.topic NOT LIKE '%/status/%' GROUP BY 1, 2, 3", (run,))}  # fmt: skip
    for r in (1, 2):
        assert bridge[("site0", r, "down")] == bridge[("site1", r, "down")] > 0
        up0, up1 = bridge[("site0", r, "up")], bridge[("site1", r, "up")]
        assert abs(up0 - up1) < 0.001 * up1  # updates differ by a few header bytes (the loss)
    assert ("site0", 3, "up") not in bridge and bridge[("site1", 3, "up")] > 0


def _two_sites(
    head: str,
    driver_ip: str,
    nodes: list[str],
    halves: list[FleetSpec],
    central: BrokerAddress,
    db: Path,
    cut: str,
) -> list[RoundResult]:
    """The Ray driver: the coordinator on ``central``, each half pinned to its node; four rounds,
    ``cut`` (site 0's link) taken down as round 3 starts (before its tasks go out, so that none
    of its updates can make it: the outcome does not depend on timing), up again at the end."""
    os.environ.update(RAY_ENV)  # before Ray is imported in this fresh process
    import ray

    from devices.ray_fleet import RayFleet

    def tamper(round_: int, w: Params) -> Params:
        if round_ == 3:
            set_link(cut, up=False)
        return w

    art = ModelArtifact.load(halves[0].model_dir)
    plan = RoundPlan(algorithm="fedsgd", lr=0.1, batch_size=8, deadline_s=60)
    ray.init(address=head, _node_ip_address=driver_ip, log_to_driver=False)
    try:
        with (
            Coordinator(
                halves[0].run, art, central, RunStore(db), plan, seed=7, tamper=tamper
            ) as coord,  # fmt: skip
            RayFleet(halves[0], node_ip=nodes[0]),
            RayFleet(halves[1], node_ip=nodes[1]),
        ):
            coord.wait_for_devices(2 * PER_SITE, 300)
            results = [coord.run_round(r) for r in range(1, 5)]
            set_link(cut, up=True)  # so that site 0 hears the end
            coord.end()
    finally:
        ray.shutdown()
    return results
