"""The demo's server-side protections: groups of devices behind edge aggregators, and the CKKS
key holder in a process of its own."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from devices.fleet import Fleet, FleetSpec
from devices.orphans import parent_death_hook
from edge.aggregator import EdgeAggregator, group_run, run_aggregator
from edge.he import KEYHOLDER
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edge.sign import Credentials


def groups(n_devices: int, k: int) -> list[range]:
    """Consecutive groups of ``k`` device indices (the last may be smaller)."""
    return [range(i, min(i + k, n_devices)) for i in range(0, n_devices, k)]


def group_names(i: int) -> tuple[str, str]:
    """(aggregator id, group name) of the demo's ``i``-th group: ``agg-g<i>``, ``g<i>``."""
    return f"agg-g{i}", f"g{i}"


def aggregator_ids(run: str, n_devices: int, k: int) -> dict[str, str]:
    """The demo's aggregators and the group run each serves (``<run>.g<i>``)."""
    names = [group_names(i) for i in range(len(groups(n_devices, k)))]
    return {agg: group_run(run, group) for agg, group in names}


class GroupedFleet:
    """The fleet split into groups of ``k`` devices, each group pinned to its own run
    ``<run>.g<i>`` behind an edge aggregator ``agg-g<i>`` (a thread here; ``python -m edge
    aggregate`` on a real gateway). Used like ``Fleet``."""

    def __init__(
        self, spec: FleetSpec, k: int, artifact: ModelArtifact, broker: BrokerAddress
    ) -> None:
        """In secure mode (``broker.pki``) each aggregator signs with its enrolled identity
        (``aggregator_ids``)."""
        self.broker = broker
        self.parts: list[tuple[EdgeAggregator, FleetSpec]] = []
        for i, idx in enumerate(groups(len(spec.devices), k)):
            devs = tuple(spec.devices[j] for j in idx)
            agg_id, group = group_names(i)
            creds = Credentials.load(broker.pki, agg_id) if broker.pki else None
            agg = EdgeAggregator(
                agg_id, spec.run, group, [d.device_id for d in devs], artifact, credentials=creds
            )
            sub = dataclasses.replace(
                spec, run=group_run(spec.run, group), devices=devs, workers=1,
                # each group's fleet numbers its workers from 0: one truth folder per group
                truth_dir=str(Path(spec.truth_dir) / group) if spec.truth_dir else None,
            )  # fmt: skip
            self.parts.append((agg, sub))
        self.fleets = [Fleet(sub) for _, sub in self.parts]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stack = ExitStack()

    @property
    def restarts(self) -> int:
        return sum(f.restarts for f in self.fleets)

    def __enter__(self) -> GroupedFleet:
        for agg, _ in self.parts:
            t = threading.Thread(
                target=run_aggregator, args=(agg, self.broker), kwargs={"stop": self._stop},
                name=agg.agg_id, daemon=True,
            )  # fmt: skip
            t.start()
            self._threads.append(t)
        for f in self.fleets:
            self._stack.enter_context(f)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()  # the fleets exit on the end their aggregator relays
        self._stop.set()
        for t in self._threads:
            t.join(10)


@contextmanager
def keyholder(broker: BrokerAddress, run: str, artifact: ModelArtifact) -> Iterator[None]:
    """``python -m edge keyholder`` for the block: its own process holds the secret key (in
    secure mode under the identity ``keyholder`` of ``broker.pki``)."""
    secure = ["--pki", broker.pki, "--id", KEYHOLDER] if broker.pki else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "keyholder", "--broker", broker.secret_url, "--run", run,
         "--model", str(artifact.folder), *secure],
        stdout=subprocess.DEVNULL, preexec_fn=parent_death_hook(),  # dies with the demo
    )  # fmt: skip
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
