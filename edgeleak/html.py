"""``edgeleak report``: one self-contained HTML file for a run or a sweep (images embedded as
data URIs, no script or style from the network), with the tables, plots, reconstruction grids,
the exact configuration and the software versions."""

from __future__ import annotations

import base64
import html
import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeleak.errors import UsageError

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e4e4e4;padding:3px 9px;text-align:right}
th{background:#f5f5f5}td.t,th.t{text-align:left}
img{max-width:100%;display:block;margin:.6em 0}pre{background:#f7f7f7;padding:.8em;overflow:auto}
.muted{color:#777}figure{margin:0 0 1.2em}figcaption{color:#555;font-size:.9em}
"""
# After load, each image carries its decoded size and the body the number of decoded images,
# so that a headless browser's DOM dump shows whether every image rendered.
CHECK = """
window.addEventListener('load',function(){var n=0;document.querySelectorAll('img').forEach(
function(i){i.dataset.rendered=i.naturalWidth+'x'+i.naturalHeight;
if(i.complete&&i.naturalWidth>0&&i.getBoundingClientRect().width>0)n++;});
document.body.dataset.imagesRendered=n;});
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def fmt(v: Any, spec: str = "") -> str:
    """A number as the report prints it ('—' for missing)."""
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return format(v, spec) if spec else str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, text_cols: int = 1) -> str:
    """An HTML table; the first ``text_cols`` columns left-aligned, the rest numbers."""

    def cell(tag: str, i: int, v: str) -> str:
        cls = ' class="t"' if i < text_cols else ""
        return f"<{tag}{cls}>{_esc(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(path: Path, caption: str) -> str:
    """A PNG embedded as a data URI, with its caption; nothing if the file is missing."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>"
    )


def text_block(path: Path, caption: str) -> str:
    """A text attack's .txt table, verbatim, with its caption; nothing if the file is missing."""
    if not path.is_file():
        return ""
    body = _esc(path.read_text(errors="replace"))
    return f"<figure><pre>{body}</pre><figcaption>{_esc(caption)}</figcaption></figure>"


def evidence(a: Mapping[str, Any], caption: str) -> str:
    """What one attack recovered: its reconstruction grid (PNG) or its text table (.txt)."""
    if a.get("grid"):
        return image(Path(a["grid"]), f"{caption}: true (top) and recovered")
    if a.get("text"):
        return text_block(Path(a["text"]), f"{caption}: typed and recovered")
    return ""


def page(title: str, sections: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_esc(title)}</h1>{''.join(sections)}<script>{CHECK}</script></body></html>"
    )


def _config_section(config: Mapping[str, Any] | None, versions: Mapping[str, str]) -> str:
    """The exact configuration (none for a sweep: its file is shown instead) and versions."""
    pre = (
        "" if config is None else f"<pre>{_esc(json.dumps(config, indent=1, sort_keys=True))}</pre>"
    )
    return (
        "<h2>Configuration and software</h2>"
        + pre
        + table(["software", "version"], [[k, str(v)] for k, v in versions.items()], text_cols=2)
    )


LEAK_HEADERS = ["attack", "device", "round", "examples", "PSNR dB", "baseline PSNR dB", "SSIM",
                "label accuracy", "exact fraction", "seconds"]  # fmt: skip
WORD_HEADERS = ["word precision", "word recall"]


def has_words(attack: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any row is the text attack's (it has word scores)."""
    return any(a.get("word_recall") is not None for a in attack)


def leak_rows(attack: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows under ``LEAK_HEADERS`` (plus ``WORD_HEADERS`` when ``has_words``)."""
    words = has_words(attack)
    return [
        [
            str(a["attack"]), str(a["device"]), fmt(a["round"]), fmt(a["examples"]),
            fmt(a.get("psnr_mean"), ".2f"), fmt(a.get("baseline_psnr"), ".2f"),
            fmt(a.get("ssim_mean"), ".3f"), fmt(a.get("label_accuracy"), ".3f"),
            fmt(a.get("exact_fraction"), ".3f"), fmt(a.get("seconds"), ".1f"),
            *([fmt(a.get("word_precision"), ".3f"), fmt(a.get("word_recall"), ".3f")]
              if words else []),
        ]
        for a in attack
    ]  # fmt: skip


def run_report(run_dir: Path) -> str:
    """The report of one run (a demo's or a coordinator's output folder)."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{run_dir}: no readable summary.json ({e})") from None
    totals = [
        ["run", s["run"]], ["model", f"{s['model']} ({s['parameters']:,} parameters)"],
        ["dataset", s["dataset"]], ["algorithm", s["algorithm"]], ["devices", s["devices"]],
        ["final accuracy", fmt(s["final_accuracy"] and 100 * s["final_accuracy"], ".2f") + " %"],
        ["bytes up", f"{s['bytes_up']:,}"], ["bytes down", f"{s['bytes_down']:,}"],
        ["bytes rejected", f"{s['bytes_rejected']:,}"], ["protect", s.get("protect") or "none"],
        ["seconds", fmt(s["seconds"], ".1f")],
    ]  # fmt: skip
    rounds = [
        [fmt(r["round"]), fmt(100 * r["accuracy"], ".2f"), fmt(r["loss"], ".4f"),
         f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{r['accepted']}/{r['selected']}",
         fmt(r["rejected"]), fmt(r["seconds"], ".2f")]
        for r in s["rounds"]
    ]  # fmt: skip
    sections = [
        "<h2>Run</h2>" + table(["", "value"], [[k, str(v)] for k, v in totals], text_cols=1),
        image(run_dir / "rounds.png", "test accuracy against traffic and per round"),
        "<h2>Rounds</h2>"
        + table(
            [
                "round",
                "accuracy %",
                "loss",
                "bytes up",
                "bytes down",
                "accepted",
                "rejected",
                "seconds",
            ],
            rounds,
        ),  # fmt: skip
    ]
    if s.get("privacy"):
        priv = [
            [d, fmt(p["epsilon"], ".4g"), fmt(p["delta"], "g"), fmt(p.get("rounds"))]
            for d, p in s["privacy"].items()
        ]
        sections.append(
            "<h2>Privacy (ε per device)</h2>" + table(["device", "ε", "δ", "rounds"], priv)
        )
    if s.get("attack"):
        sections.append("<h2>Leakage of intercepted updates</h2>")
        headers = LEAK_HEADERS + (WORD_HEADERS if has_words(s["attack"]) else [])
        sections.append(table(headers, leak_rows(s["attack"]), text_cols=2))
        for a in s["attack"]:
            sections.append(evidence(a, f"{a['attack']}, round {a['round']}, device {a['device']}"))
    sections.append(_config_section(s["config"], s.get("versions", {})))
    return page(f"edgeleak run {s['run']}", sections)


def sweep_report(sweep_dir: Path) -> str:
    """The report of a sweep: points, Pareto fronts, accuracy and bytes, ε, grids, claims."""
    from edgeleak import results
    from edgeleak.figures import plot_epsilon, plot_pareto, plot_points
    from edgeleak.report import software_versions

    res = results.load(sweep_dir)
    with sqlite3.connect(results.sweep_db(sweep_dir)) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    name = meta.get("name", sweep_dir.name)
    figs = sweep_dir / "figures"
    figs.mkdir(exist_ok=True)
    p = res.points
    rows = [
        [
            str(r.label), fmt(r.seed), str(r.status), fmt(_num(r.final_accuracy, 100), ".2f"),
            fmt(_num(r.bytes_per_round, 1e-6), ".3f"), fmt(_num(r.epsilon), ".3g"),
            fmt(_num(r.psnr_mean), ".2f"), fmt(_num(r.baseline_psnr), ".2f"),
            fmt(_num(r.label_accuracy), ".3f"), fmt(_num(r.exact_fraction), ".3f"),
            fmt(_num(r.seconds), ".0f"), str(r.error or ""),
        ]
        for r in p.itertuples()
    ]  # fmt: skip
    sections = [
        "<h2>Points</h2>",
        table(
            [
                "setting",
                "seed",
                "status",
                "accuracy %",
                "MB per round",
                "ε",
                "PSNR dB",
                "baseline dB",
                "label acc.",
                "exact frac.",
                "seconds",
                "error",
            ],
            rows,
            text_cols=1,
        ),  # fmt: skip
    ]
    if plot_pareto(p, figs / "pareto.png", title=name):
        sections.append(image(figs / "pareto.png", "leakage against bytes and accuracy "
                              "(mean over seeds; ringed: non-dominated)"))  # fmt: skip
    if plot_points(p, figs / "points.png", title=name):
        sections.append(image(figs / "points.png", "final accuracy and bytes per round"))
    if plot_epsilon(p, res.rounds, figs / "epsilon.png", title=name):
        sections.append(image(figs / "epsilon.png", "ε per device over the rounds"))
    claims = sweep_dir / "claims.json"
    if claims.is_file():
        c = json.loads(claims.read_text())["claims"]
        sections.append("<h2>The article's claims on this testbed</h2>")
        sections.append(
            table(
                ["#", "claim", "setting", "measured", "verdict"],
                [[str(x["id"]), x["claim"], x["setting"], x["measured"], x["verdict"]] for x in c],
                text_cols=5,
            )  # fmt: skip
        )
    leak = res.leakage
    if len(leak):
        shown = leak["grid"].fillna("").astype(bool) | leak["text"].fillna("").astype(bool)
        leak = leak[shown]
    if len(leak):
        sections.append("<h2>Reconstructions (first attacked update of each point)</h2>")
        labels = dict(zip(p["point"], p["label"], strict=True))
        seeds = dict(zip(p["point"], p["seed"], strict=True))
        for point, g in leak.groupby("point", sort=False):
            a = g.iloc[0].where(g.iloc[0].notna(), None).to_dict()
            sections.append(
                evidence(
                    a,
                    f"{labels[point]} (seed {seeds[point]}): "
                    f"{a['attack']} on round {a['round']}, device {a['device']}",
                )
            )
    sections.append(f"<h2>Sweep file</h2><pre>{_esc(meta.get('source', ''))}</pre>")
    sections.append(_config_section(None, software_versions()))
    return page(f"edgeleak sweep {name}", sections)


def _num(v: Any, scale: float = 1.0) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if x != x else x * scale


def write_report(target: Path, out: Path | None = None) -> Path:
    """Write the report of a run or sweep folder; default ``<folder>/report.html``."""
    if not target.is_dir():
        raise UsageError(f"{target}: not a folder; expected a run's or a sweep's output folder")
    if (target / "sweep.db").is_file():
        text = sweep_report(target)
    elif (target / "summary.json").is_file():
        text = run_report(target)
    else:
        raise UsageError(
            f"{target}: neither a run (summary.json) nor a sweep (sweep.db) output folder"
        )
    dest = out or target / "report.html"
    dest.write_text(text)
    return dest
