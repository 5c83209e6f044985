"""``edgeleak sweep --preset claims``: the claims of the article the project started from (Geiping
et al. 2020, "Inverting Gradients", as summarised in the seed article), each run on this testbed
as sweep points and judged by a stated rule. A claim whose capability the testbed lacks is
reported as "not tested", never as holding."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeleak.config import ConfigError, ExperimentConfig
from edgeleak.sweep import Point, Sweep, label, point_id

# One FedSGD round of two emulated devices, every update attacked: the eavesdropper's view.
# Optimisation attacks stop on iterations (the same result on any machine); the time budget is
# only a safety net.
BASE: dict[str, Any] = {
    "devices": 2, "rounds": 1, "algorithm": "fedsgd", "batch_size": 1, "model": "lenet_zhu",
    "dataset": "fashion-mnist", "attack": "inverting_gradients", "attack_max": 2,
    "attack_iterations": 2000, "attack_budget_s": 3600.0, "workers": 1, "seed": 0,
}  # fmt: skip
# A fleet with small shards (mnist-digits: 4,000 training images): 40 devices of 100 images,
# 2 selected per round, so that a batch of up to 100 is one device's whole shard.
SMALL_SHARDS: dict[str, Any] = {"dataset": "mnist-digits", "devices": 40, "fraction": 0.05}
BATCHES = (1, 8, 32, 100)
PERMUTE_BATCH = 32  # at B=8 the honest MLP already has most examples alone on some unit
DB_GAP = 3.0  # dB: "not much safer", "lowers leakage"
TRAINED_ACCURACY = 0.5  # claim 1's "trained" model must reach this test accuracy to count


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    setting: str  # what was run, in words
    points: dict[str, dict[str, Any]]  # role → config overrides of BASE
    judge: Callable[[Mapping[str, Mapping[str, Any]]], tuple[str, str]]  # rows → measured, verdict


def _psnr(r: Mapping[str, Any]) -> str:
    return f"{r['psnr_mean']:.1f} dB (mean image {r['baseline_psnr']:.1f} dB)"


def _judge_trained(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    u, t = rows["untrained"], rows["trained"]
    measured = (
        f"untrained {_psnr(u)}; trained (accuracy {100 * t['final_accuracy']:.1f}%) {_psnr(t)}"
    )
    if t["final_accuracy"] < TRAINED_ACCURACY:
        return measured + "; the model did not train, so the trained half is untested", "not tested"
    works = [r["psnr_mean"] - r["baseline_psnr"] >= DB_GAP for r in (u, t)]
    return measured, "holds" if all(works) else "partly" if any(works) else "does not hold"


def _judge_deep(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    s, d = rows["shallow"], rows["deep"]
    measured = f"shallow lenet_zhu {_psnr(s)}; deeper convnet {_psnr(d)}"
    if d["psnr_mean"] >= s["psnr_mean"] - DB_GAP:
        return measured, "holds"
    above = d["psnr_mean"] - d["baseline_psnr"] >= DB_GAP
    return measured, "partly" if above else "does not hold"


def _judge_analytic(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    r = rows["mlp"]
    measured = f"exact fraction {r['exact_fraction']:.2f}, {_psnr(r)}"
    return measured, "holds" if r["exact_fraction"] >= 0.99 else "does not hold"


def _judge_dishonest(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    h, m = rows["honest"], rows["dishonest"]
    measured = (
        f"batch of 8: honest analytic exact fraction {h['exact_fraction']:.2f}; "
        f"imprint-modified model {m['exact_fraction']:.2f}"
    )
    gain = m["exact_fraction"] - h["exact_fraction"]
    return measured, "holds" if gain >= 0.5 else "partly" if gain > 0 else "does not hold"


def _judge_permuted(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    h, m = rows["honest"], rows["permuted"]
    measured = (
        f"batch of {PERMUTE_BATCH}, the same analytic attack: honest model exact fraction "
        f"{h['exact_fraction']:.2f}; rows permuted {m['exact_fraction']:.2f}"
    )
    far = m["exact_fraction"] >= max(5 * h["exact_fraction"], 0.1)
    more = m["exact_fraction"] > h["exact_fraction"]
    return measured, "holds" if far else "partly" if more else "does not hold"


def _judge_fedavg(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    s, a = rows["fedsgd"], rows["fedavg"]
    measured = f"10 images: FedSGD (one gradient) {_psnr(s)}; FedAvg (5 local steps) {_psnr(a)}"
    if a["psnr_mean"] >= s["psnr_mean"] - DB_GAP:
        return measured, "holds"
    above = a["psnr_mean"] - a["baseline_psnr"] >= DB_GAP
    return measured, "partly" if above else "does not hold"


def _judge_batches(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    parts = [f"B={b}: {100 * rows[f'b{b}']['recovered_fraction']:.0f}%" for b in BATCHES]
    fracs = [rows[f"b{b}"]["recovered_fraction"] for b in BATCHES]
    measured = "images recovered (≥ 30 dB): " + ", ".join(parts)
    if fracs[-1] > 0 and fracs[1] > 0:
        return measured, "holds"
    return measured, "partly" if any(f > 0 for f in fracs[1:]) else "does not hold"


def _judge_words(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    r = rows["keyboard"]
    measured = (
        f"word precision {r['word_precision']:.2f}, recall {r['word_recall']:.2f}; "
        f"windows with their next word exact {r['exact_fraction']:.2f}"
    )
    recall = r["word_recall"]
    return measured, "holds" if recall >= 0.9 else "partly" if recall > 0 else "does not hold"


def _judge_protection(name: str) -> Callable[[Mapping[str, Mapping[str, Any]]], tuple[str, str]]:
    def judge(rows: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
        b, p = rows["none"], rows[name]
        ratio = p["bytes_per_round"] / b["bytes_per_round"]
        measured = (
            f"attacker {p['psnr_mean']:.1f} dB against {b['psnr_mean']:.1f} dB unprotected "
            f"(mean image {b['baseline_psnr']:.1f} dB); bytes per round × {ratio:.2f}"
        )
        eps = p.get("epsilon")
        if eps is not None and eps == eps:  # pandas reads a missing ε as NaN
            measured += f"; ε = {eps:.3g}"
        drop = b["psnr_mean"] - p["psnr_mean"]
        return measured, "holds" if drop >= DB_GAP else "partly" if drop > 0 else "does not hold"

    return judge


PROTECTIONS: dict[str, dict[str, Any]] = {
    "dp (ε = 8)": {"protect": "dp:clip=1", "dp_epsilon": 8.0},
    "dummy examples": {"protect": "dummy:m=4"},
    "decoy updates": {"decoys": 3, "attack_max": 8},
    "top-k + int8": {"codec": "topk:0.01+int8"},
}


def claims() -> list[Claim]:
    """The claims and the points that test them."""
    small = dict(SMALL_SHARDS)
    out = [
        Claim("1", "reconstruction works for trained and untrained models",
              "the ReLU convnet, FedSGD, B=1, inverting gradients; trained: 50 FedSGD rounds of "
              f"50 devices (it must reach {TRAINED_ACCURACY:.0%} test accuracy), the last round "
              f"attacked; holds when both beat the mean image by {DB_GAP:g} dB (the sigmoid "
              "LeNetZhu does not train in that many rounds)",
              {"untrained": {"model": "convnet"},
               "trained": {"model": "convnet", "devices": 50, "rounds": 50, "attack_round": 50}},
              _judge_trained),
        Claim("2", "a deep network is not much safer than a shallow one",
              f"inverting gradients at B=1 on lenet_zhu and on the deeper convnet; holds when "
              f"the deep one's PSNR is within {DB_GAP:g} dB",
              {"shallow": {}, "deep": {"model": "convnet"}}, _judge_deep),
        Claim("3", "the input of a fully connected layer is recovered analytically, "
              "whatever comes after it",
              "zoo mlp (784-…-10), FedSGD, B=1, analytic attack on the first layer",
              {"mlp": {"model": "mlp", "attack": "analytic"}}, _judge_analytic),
        Claim("4", "a dishonest coordinator that modifies the model recovers far more",
              "mlp, FedSGD, B=8: honest model + analytic attack vs imprint-modified model "
              "(128 bins) + imprint attack",
              {"honest": {"model": "mlp", "batch_size": 8, "attack": "analytic"},
               "dishonest": {"model": "mlp", "batch_size": 8, "attack": "imprint",
                             "malicious": "imprint"}},
              _judge_dishonest),
        Claim("4b", "dishonesties can be as subtle as permuting some network parameters",
              f"mlp, FedSGD, B={PERMUTE_BATCH}, analytic attack (units one example fired alone) "
              "on the honest model vs the same model with each first-layer row permuted "
              "(values unchanged) so a unit fires for about 1/B of public images; holds when "
              "≥ 5× as many images come out exact (and ≥ 10% of the batch)",
              {"honest": {"model": "mlp", "batch_size": PERMUTE_BATCH, "attack": "analytic"},
               "permuted": {"model": "mlp", "batch_size": PERMUTE_BATCH, "attack": "analytic",
                            "malicious": "permute"}},
              _judge_permuted),
        Claim("5", "FedAvg with several local steps is no safer than FedSGD",
              "lenet_zhu on mnist-digits shards of 10 images: FedSGD on all 10 (inverting "
              "gradients) vs FedAvg, batch 2, 1 epoch = 5 steps (FedAvg inversion)",
              {"fedsgd": {"dataset": "mnist-digits", "devices": 400, "fraction": 0.005,
                          "batch_size": 0},
               "fedavg": {"dataset": "mnist-digits", "devices": 400, "fraction": 0.005,
                          "algorithm": "fedavg", "batch_size": 2, "epochs": 1,
                          "attack": "fedavg"}},
              _judge_fedavg),
        Claim("6", "separate images are recovered from a gradient averaged over a batch, "
              "even of 100",
              "lenet_zhu on mnist-digits (shards of 100), FedSGD, inverting gradients at "
              f"B = {', '.join(map(str, BATCHES))}; fraction of images ≥ 30 dB",
              {f"b{b}": {**small, "batch_size": b} for b in BATCHES}, _judge_batches),
        Claim("7", "the words a user typed leak from a simple NLP model's gradients",
              "zoo keyboard next-word model on the fortunes corpus (one device per source), "
              "FedSGD, B=8, words attack on the intercepted gradients; holds when word "
              "recall ≥ 0.9",
              {"keyboard": {"model": "keyboard", "dataset": "fortunes", "partition": "source",
                            "batch_size": 8, "attack": "words"}}, _judge_words),
    ]  # fmt: skip
    for i, (name, over) in enumerate(PROTECTIONS.items()):
        out.append(
            Claim(
                f"8{'abcd'[i]}",
                f"protection: {name} lowers what leaks, at a price",
                f"lenet_zhu, FedSGD, B=1, inverting gradients, with {label(over)}; holds "
                f"when the attacker loses ≥ {DB_GAP:g} dB",
                {"none": {}, name: over},
                _judge_protection(name),
            )  # fmt: skip
        )
    return out


# Claims the testbed cannot run yet, reported as such: (id, claim, why).
NOT_TESTED: tuple[tuple[str, str, str], ...] = ()


def _config(over: Mapping[str, Any]) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**BASE, **over})


def preset(name: str) -> Sweep:
    """The built-in sweep ``name`` (only ``claims``)."""
    if name != "claims":
        raise ConfigError(f"--preset {name!r}: expected claims")
    points: dict[str, Point] = {}
    for c in claims():
        for role, over in c.points.items():
            cfg = _config(over)
            pid = point_id(cfg.to_dict())
            points.setdefault(pid, Point(pid, f"claim {c.id}: {role}", dict(over), cfg))
    return Sweep("claims", list(points.values()), "preset claims")


def evaluate(out: Path, name: str = "claims") -> list[dict[str, Any]]:
    """The claims table from a finished claims sweep in ``out`` (also written to claims.json)."""
    import json

    from edgeleak import results

    if name != "claims":
        raise ConfigError(f"--preset {name!r}: expected claims")
    pts = results.load(out).points
    by_id = {str(r["point"]): r for r in pts.to_dict("records")}
    table = []
    for c in claims():
        rows = {role: by_id.get(point_id(_config(o).to_dict())) for role, o in c.points.items()}
        missing = [role for role, r in rows.items() if r is None or r["status"] != "done"]
        if missing:
            measured, verdict = f"points not finished: {', '.join(missing)}", "not tested"
        else:
            measured, verdict = c.judge({k: v for k, v in rows.items() if v is not None})
        table.append({"id": c.id, "claim": c.claim, "setting": c.setting,
                      "measured": measured, "verdict": verdict})  # fmt: skip
    for cid, claim, why in NOT_TESTED:
        table.append({"id": cid, "claim": claim, "setting": "—", "measured": why,
                      "verdict": "not tested"})  # fmt: skip
    table.sort(key=lambda r: (int(r["id"][0]), r["id"]))
    (out / "claims.json").write_text(json.dumps({"claims": table}, indent=1))
    return table
