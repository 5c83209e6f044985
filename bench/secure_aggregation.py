"""Server-side protections, measured over the real wire (issue 9's figures).

    python bench/secure_aggregation.py --json PATH [--parts aggregation he] [--budget-s S]

Writes ``{"secagg": [...], "he": [...], "aggregation": [...]}``: the ``aggregation`` and ``he``
rows come from ``bench/server_side.py`` (``measure_aggregation``, ``measure_he``); ``secagg``
stays empty in this file until the secure-aggregation bench fills it.
"""
# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse
import json
from typing import Any

import server_side


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write the figures here")
    ap.add_argument(
        "--parts", nargs="+", choices=("aggregation", "he"), default=["aggregation", "he"]
    )
    ap.add_argument("--iterations", type=int, default=2000, help="IG iterations per aggregate")
    ap.add_argument("--budget-s", type=float, default=900.0, help="IG time cap per aggregate")
    ap.add_argument("--ks", type=int, nargs="+", default=list(server_side.KS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: dict[str, list[dict[str, Any]]] = {"secagg": [], "he": [], "aggregation": []}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "he" in args.parts:
        out["he"] = server_side.measure_he(seed=args.seed)
        path.write_text(json.dumps(out, indent=2))
    if "aggregation" in args.parts:
        out["aggregation"] = server_side.measure_aggregation(
            args.ks, iterations=args.iterations, budget_s=args.budget_s, seed=args.seed
        )
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
