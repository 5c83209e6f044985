"""Faults and hostile input at volume (issue 11): ``python bench/faults.py --json PATH``.

Runs, each with the real broker and real processes: a fleet worker holding 30% of the devices
SIGKILLed mid-round; mosquitto killed with ``kill -9`` mid-round and restarted (persistence on
every change, persistent MQTT 5 sessions); a device process in a network namespace behind 1%
packet loss each way and a 300 ms RTT (needs root and ``ip``/``tc``; skipped with the reason
otherwise; its ``recovery_seconds`` is the slowest round); and ``--flood`` hostile messages
through the broker during a real run, compared with the clean run of the same seed. Writes::

    {"faults": [{"fault", "rounds_completed", "updates_sent", "updates_accepted",
                 "duplicates_aggregated", "lost", "recovery_seconds"}],
     "fuzz": {"messages", "crashes", "rejected_by_reason", "model_identical"}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.netem import missing_tools  # noqa: E402
from edge.manifest import ModelArtifact  # noqa: E402
from edgeleak.broker import local_broker  # noqa: E402
from tests.faultlab import (  # noqa: E402
    broker_crash_run,
    clean_and_flooded,
    dropout_run,
    lossy_link_run,
)

ROW = ("fault", "rounds_completed", "updates_sent", "updates_accepted", "duplicates_aggregated",
       "lost", "recovery_seconds")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--flood", type=int, default=10_000, help="hostile messages (default 10000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    from export import export_model

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeleak-faults-") as tmp_s:
        tmp = Path(tmp_s)
        artifact: ModelArtifact = export_model("lenet", tmp / "lenet", seed=0)
        faults = []
        with local_broker("mosquitto") as (broker, _):
            faults.append(dropout_run(artifact, broker, tmp, rounds=args.rounds))
            if (why := missing_tools()) is None:
                faults.append(lossy_link_run(artifact, broker, tmp, rounds=args.rounds)[0])
            else:
                print(f"lossy link skipped: {why}")
            clean, hostile = clean_and_flooded(
                broker, artifact, tmp, total=args.flood, rounds=args.rounds
            )
        res, _, _, _ = broker_crash_run(artifact, tmp / "crash", rounds=args.rounds)
        faults.append(res)
    rows = [{k: asdict(f)[k] for k in ROW} for f in faults]
    complete = [s == a for s, a, _ in hostile.rounds]
    out = {
        "faults": rows,
        "fuzz": {
            "messages": hostile.sent,
            # the coordinator and every fleet worker stayed up, and every round completed
            "crashes": hostile.restarts + complete.count(False),
            "rejected_by_reason": hostile.rejected_by_reason,
            "model_identical": hostile.final_sha256 == clean.final_sha256,
        },
    }
    for r in rows:
        print(
            f"{r['fault']:>22}: {r['rounds_completed']} rounds, {r['updates_accepted']}/"
            f"{r['updates_sent']} updates accepted, {r['duplicates_aggregated']} aggregated "
            f"twice, {r['lost']} lost, recovered in {r['recovery_seconds']:.2f} s"
        )
    f = out["fuzz"]
    print(
        f"flood: {f['messages']} hostile messages, {f['crashes']} crashes, "
        f"{sum(hostile.rejected_by_reason.values())} rejected, model identical: "
        f"{f['model_identical']} ({hostile.seconds:.1f} s vs clean {clean.seconds:.1f} s; "
        f"load {os.getloadavg()[0]:.1f}; total {time.monotonic() - t0:.0f} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
