"""The fleet on a Ray cluster (``--engine ray``): each worker of ``devices.fleet`` becomes a Ray
actor that runs the same devices on the same selector loop (``devices.fleet.serve_shard``).

Ray places the actors on the cluster's nodes (one CPU each), or on one node (``node_ip``: a
site's shard on the node next to its site broker). The devices' results do not depend on where
they run: device i trains with its own seed on its own examples, so a run is bit-identical on
either engine. Each node needs this package (with its shipped datasets); the model's files
travel with the actors. The broker URL in the spec must be reachable from every node
(``127.0.0.1`` only on a one-machine cluster, or a site broker on each node's own host).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from devices.fleet import FleetSpec, serve_shard, shards
from edge.codec import keep_message_buffers

log = logging.getLogger(__name__)

INSTALL = "the ray engine needs Ray: pip install 'edgeleak[ray]'"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL) from None
    return ray


class FleetActor:
    """One worker's devices inside a Ray actor; ``stop`` ends ``run`` (a threaded actor)."""

    def __init__(self, spec: FleetSpec, shard: list[Any], worker_id: int, model: dict[str, bytes]):
        self._stop = threading.Event()
        if not Path(spec.model_dir).is_dir():  # another machine: the model's files travelled
            folder = Path(tempfile.mkdtemp(prefix="edgeleak-model-"))
            for name, data in model.items():
                (folder / name).write_bytes(data)
            spec = dataclasses.replace(spec, model_dir=str(folder))
        self.spec, self.shard, self.worker_id = spec, shard, worker_id

    def run(self) -> int:
        """Serve the devices until the run's end or ``stop``; returns how many there were."""
        keep_message_buffers()
        serve_shard(self.spec, self.shard, self.worker_id, self._stop)
        return len(self.shard)

    def stop(self) -> None:
        self._stop.set()


class RayFleet:
    """``devices.fleet.Fleet``'s interface on Ray: the actors for the block, stopped after it.

    ``address``: ``auto`` (a cluster started with ``ray start``), ``HOST:PORT`` of its head, or
    ``local`` (a one-machine cluster started here for the block). A dead actor is not
    restarted: its devices miss the rest of the run (``restarts`` stays 0)."""

    def __init__(self, spec: FleetSpec, address: str = "auto", *, node_ip: str | None = None):
        if not spec.devices:
            raise ValueError("a fleet needs at least one device")
        self.spec, self.address, self.node_ip = spec, address, node_ip
        self.restarts = 0
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self._started = False
        self._env: dict[str, str] = {}  # RAY_* variables before this fleet started a cluster

    def __enter__(self) -> RayFleet:
        ray = _ray()
        if not ray.is_initialized():
            address = None if self.address == "local" else self.address
            self._env = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
            self._started = True
        model = {p.name: p.read_bytes() for p in Path(self.spec.model_dir).iterdir() if p.is_file()}
        actor = ray.remote(num_cpus=1, max_concurrency=2)(FleetActor)
        if self.node_ip is not None:
            actor = actor.options(resources={f"node:{self.node_ip}": 0.001})
        for w, shard in enumerate(shards(self.spec)):
            self.actors.append(actor.remote(self.spec, shard, w, model))
        self.runs = [a.run.remote() for a in self.actors]
        return self

    def alive(self) -> bool:
        ray = _ray()
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return not done

    def __exit__(self, *exc: object) -> None:
        ray = _ray()
        for a in self.actors:
            a.stop.remote()
        try:
            ray.get(self.runs, timeout=60)
        except Exception as e:  # an actor that died or hung: its devices are gone anyway
            log.warning("ray fleet: %s", e)
        for a in self.actors:
            ray.kill(a)
        if self._started:
            ray.shutdown()
            # ray.init leaves RAY_* settings (its auth mode) that a later cluster must not inherit
            for k in [k for k in os.environ if k.startswith("RAY_") and k not in self._env]:
                del os.environ[k]
            os.environ.update(self._env)
