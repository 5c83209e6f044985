"""Round time, memory and transport overhead of the emulated fleet over a real broker.

For each fleet size N, all of Fashion-MNIST is split IID over N devices and every device runs
one FedAvg epoch (B=32) per round on the ONNX runtime, over mosquitto. The baseline is the same
local training and aggregation in a bare in-process loop, no MQTT, measured in the same run:
once before and once after the fleet's rounds, and their mean is the baseline (this VM's speed
drifts by tens of percent within minutes; both figures are in the JSON).

    python bench/rounds.py --json rounds.json [--devices 10 100 1000] [--rounds 3]
                           [--engine local|ray [--ray-address local|auto|HOST:PORT]]

Peak memory is sampled every 0.2 s over this process (the coordinator), the broker and the
fleet's workers, in all and per part. The codec line compares encode+decode of one LeNet update
with a copy of the same bytes, both measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregate import apply_update, weighted_mean
from coordinator.server import Coordinator, RoundPlan
from coordinator.store import RunStore
from devices.datasets import load_dataset
from devices.fleet import DeviceSpec, Fleet, FleetSpec
from devices.partition import iid
from edge import wire
from edge.backends import load_backend
from edge.codec import keep_message_buffers
from edge.manifest import ModelArtifact
from edge.train import fedavg
from edgeleak.broker import local_broker


def rss_mb(pids: list[int]) -> float:
    """Sum of the resident set sizes of ``pids`` (MB), read from /proc."""
    return sum(_rss_kb(pid) for pid in pids) / 1024


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out += [int(k), *child_pids(int(k))]
    return out


class PeakRss:
    """Samples the RSS of this process and all its descendants (fleet workers, broker): the
    peak of their sum, and each part's own peak (``parts``: coordinator, broker, fleet); and
    the CPU seconds each part has used (``cpu``, from each process's last sample)."""

    def __init__(self, period: float = 0.2) -> None:
        self.peak = 0.0
        self.parts: dict[str, float] = {}
        self._cpu: dict[int, tuple[str, float]] = {}
        self._cpu_before = _cpu_seconds(os.getpid())  # this process's CPU before the fleet
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            now = {"coordinator": _rss_kb(me) / 1024, "broker": 0.0, "fleet": 0.0}
            self._cpu[me] = ("coordinator", _cpu_seconds(me))
            for pid in child_pids(me):
                part = "broker" if _comm(pid) == "mosquitto" else "fleet"
                now[part] += _rss_kb(pid) / 1024
                self._cpu[pid] = (part, _cpu_seconds(pid) or self._cpu.get(pid, ("", 0.0))[1])
            self.peak = max(self.peak, sum(now.values()))
            for k, v in now.items():
                self.parts[k] = max(self.parts.get(k, 0.0), v)
            time.sleep(period)

    def cpu(self) -> dict[str, float]:
        """CPU seconds per part, as last sampled."""
        out = {"coordinator": -self._cpu_before, "broker": 0.0, "fleet": 0.0}
        for part, seconds in self._cpu.values():
            out[part] += seconds
        return {k: round(v, 1) for k, v in out.items()}

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def bare_round_apart(model_dir: str, shards: list[np.ndarray], plan: RoundPlan) -> float:
    """``bare_round`` in a process of its own, so that its memory is not counted as the
    coordinator's (this process's heap keeps what it once held: ``keep_message_buffers``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_bare_round_of, model_dir, shards, plan).result()


def _bare_round_of(model_dir: str, shards: list[np.ndarray], plan: RoundPlan) -> float:
    keep_message_buffers()  # the same allocator settings as the fleet's processes
    data = load_dataset("fashion-mnist")
    return bare_round(ModelArtifact.load(model_dir), data.x_train, data.y_train, shards, plan)


def bare_round(
    artifact: ModelArtifact, x: np.ndarray, y: np.ndarray, shards: list[np.ndarray], plan: RoundPlan
) -> float:
    """Seconds for one round of the same local training and aggregation, in-process, no MQTT."""
    backend = load_backend("onnx", artifact)
    w = artifact.initial_params()
    t0 = time.perf_counter()
    ups = []
    for i, s in enumerate(shards):
        r = fedavg(
            backend,
            w,
            x[s],
            y[s],
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            lr=plan.lr,
            rng=np.random.default_rng([i, 1]),
        )
        ups.append((r.params, r.num_examples))
    apply_update(w, weighted_mean(ups), kind="delta", server_lr=1.0)
    return time.perf_counter() - t0


def fleet_rounds(
    artifact: ModelArtifact,
    n: int,
    rounds: int,
    plan: RoundPlan,
    shards: list[np.ndarray],
    workers: int,
    engine: str = "local",
    ray_address: str = "local",
) -> dict[str, Any]:
    run = "bench" + uuid.uuid4().hex[:6]
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_broker("mosquitto") as (broker, _),
        PeakRss() as rss,
    ):
        store = RunStore(Path(tmp) / "run.db")
        devices = tuple(DeviceSpec(f"d{i:04d}", s, "onnx", seed=i) for i, s in enumerate(shards))
        spec = FleetSpec(run, broker.url, str(artifact.folder), "fashion-mnist", devices, workers)
        t_connect = time.perf_counter()
        if engine == "ray":
            from devices.ray_fleet import RayFleet

            devices_on: Fleet | RayFleet = RayFleet(spec, ray_address)
        else:
            devices_on = Fleet(spec)
        nodes = 1
        with Coordinator(run, artifact, broker, store, plan) as coord, devices_on:
            if engine == "ray":
                import ray

                nodes = sum(1 for node in ray.nodes() if node["Alive"])
            coord.wait_for_devices(n, 120 + n * 0.2)
            t_connect = time.perf_counter() - t_connect
            time.sleep(2)  # idle: every device connected, none training
            idle = rss_mb([os.getpid(), *child_pids(os.getpid())])
            warmup = 1 if rounds > 1 else 0  # round 1 pays for session warm-up
            results = [coord.run_round(r) for r in range(1, warmup + 1)]
            cpu_before = rss.cpu()
            results += [coord.run_round(r) for r in range(warmup + 1, rounds + 1)]
            timed_cpu = {
                k: round((v - cpu_before[k]) / (rounds - warmup), 1) for k, v in rss.cpu().items()
            }
            coord.end()
        store.close()
    timed = results[warmup:]
    return {
        "engine": engine,
        "nodes": nodes,
        "devices": n,
        "seconds_per_round": float(np.mean([r.seconds for r in timed])),
        "peak_rss_mb": round(rss.peak, 1),
        "peak_rss_mb_by_part": {k: round(v, 1) for k, v in rss.parts.items()},
        "cpu_seconds_by_part": rss.cpu(),  # the whole run: connect, idle and every round
        "cpu_seconds_per_round_by_part": timed_cpu,  # the timed rounds only
        "lost_messages": int(sum(r.selected - r.accepted for r in results)),
        "connect_seconds": round(t_connect, 2),
        "idle_rss_mb": round(idle, 1),  # all connected, before the first round
        "mb_per_round": (results[-1].bytes_up + results[-1].bytes_down) / 1e6,
    }


def codec_figures(artifact: ModelArtifact, iters: int = 300, repeats: int = 7) -> dict[str, float]:
    """Encode+decode throughput of a LeNet update (the best of ``repeats`` blocks of ``iters``,
    as ``timeit`` reports: the other blocks measure what else ran) and the header overhead."""
    w = artifact.initial_params()
    upd = wire.Update(run="bench", round=1, device="d0000", kind="delta", num_examples=60, params=w)
    payload = wire.encode_update(upd)
    raw = sum(v.nbytes for v in w.values())

    def best(f: Any) -> float:
        blocks = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            blocks.append((time.perf_counter() - t0) / iters)
        return min(blocks)

    enc = best(lambda: wire.encode_update(upd))
    dec = best(lambda: wire.decode_update(payload, artifact.manifest))
    flat = np.concatenate([v.ravel() for v in w.values()])
    copy = best(flat.copy)  # the baseline: one copy of the same bytes, measured alongside
    return {
        "gb_per_s": raw / (enc + dec) / 1e9,
        "copy_gb_per_s": raw / copy / 1e9,
        "encode_us": enc * 1e6,
        "decode_us": dec * 1e6,
        "header_overhead_pct": 100 * (len(payload) - raw) / raw,
        "payload_bytes": len(payload),
        "tensor_bytes": raw,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument(
        "--ray-address", default="local", help="with --engine ray: local|auto|HOST:PORT"
    )
    args = ap.parse_args()
    keep_message_buffers()  # as the CLI's processes do

    from rich.console import Console
    from rich.table import Table

    from export import export_model

    console = Console()
    # only its size: the coordinator (this process) holds no dataset, as in a real run
    n_train = len(load_dataset("fashion-mnist").y_train)
    plan = RoundPlan(algorithm="fedavg", lr=0.05, epochs=1, batch_size=32, deadline_s=600)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        artifact = export_model("lenet", tmp, seed=0)
        codec = codec_figures(artifact)
        for n in args.devices:
            shards = iid(n_train, n, seed=0)
            console.print(f"[bold]{n} devices[/]: bare loop ...")
            before = bare_round_apart(str(artifact.folder), shards, plan)
            console.print(f"[bold]{n} devices[/]: fleet over mosquitto, {args.rounds} rounds ...")
            row = fleet_rounds(
                artifact, n, args.rounds, plan, shards, args.workers, args.engine, args.ray_address
            )
            console.print(f"[bold]{n} devices[/]: bare loop again ...")
            after = bare_round_apart(str(artifact.folder), shards, plan)
            bare = (before + after) / 2
            row["bare_loop_seconds_before_after"] = [before, after]
            row["bare_loop_seconds"] = bare
            row["overhead_ratio"] = row["seconds_per_round"] / bare
            rows.append(row)
    table = Table(
        title="rounds over mosquitto (lenet, FedAvg E=1 B=32, all of Fashion-MNIST per round)"
    )
    for col in (
        "devices",
        "s/round",
        "bare loop s",
        "ratio",
        "peak RSS MB",
        "idle RSS MB",
        "lost",
        "connect s",
        "MB/round",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["devices"]),
            f"{r['seconds_per_round']:.2f}",
            f"{r['bare_loop_seconds']:.2f}",
            f"{r['overhead_ratio']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['idle_rss_mb']:.0f}",
            str(r["lost_messages"]),
            f"{r['connect_seconds']:.1f}",
            f"{r['mb_per_round']:.1f}",
        )
    console.print(table)
    console.print(
        f"codec: {codec['gb_per_s']:.2f} GB/s encode+decode (encode {codec['encode_us']:.0f} µs, "
        f"decode {codec['decode_us']:.0f} µs; a copy of the same bytes "
        f"{codec['copy_gb_per_s']:.1f} GB/s), header overhead "
        f"{codec['header_overhead_pct']:.2f}% ({codec['payload_bytes']} B payload)"
    )
    Path(args.json).write_text(json.dumps({"rounds": rows, "codec": codec}, indent=2))


if __name__ == "__main__":
    main()
