"""Decoys as a protection (``decoys:k=K``) in a live demo on the real broker, and the leakage
scoring that maps the eavesdropper's pseudonyms back to devices with the demo's keys."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from attacks.intercept import CaptureStore
from attacks.truth.metrics import mean_image_psnr, psnr_matrix
from devices.datasets import load_dataset
from devices.fleet import read_truth
from edge import decoy, protect
from edge.codec import read_header
from edge.manifest import ModelArtifact
from edge.mqtt import BrokerAddress
from edgeleak.config import ConfigError, ExperimentConfig
from edgeleak.experiment import run_experiment
from edgeleak.leak import decoy_slots


def test_decoys_alias_and_spec_are_one_protection() -> None:
    assert ExperimentConfig(decoys=2).protect == "decoys:k=2"
    assert ExperimentConfig(protect="decoys:k=2").decoys == 2
    both = ExperimentConfig(protect="dp:clip=1,sigma=0.5", decoys=3)
    assert (both.protect, both.decoys) == ("dp:clip=1.0,sigma=0.5;decoys:k=3", 3)
    assert ExperimentConfig.from_dict(both.to_dict()) == both
    with pytest.raises(ConfigError, match="decoys=3 and protect decoys:k=2 disagree"):
        ExperimentConfig(protect="decoys:k=2", decoys=3)
    with pytest.raises(ConfigError, match=r"decoys: k=33; expected an integer in 1\.\.32"):
        ExperimentConfig(protect="decoys:k=33")
    steps = protect.parse("decoys:2;dummy:m=1")
    assert [s.name for s in steps] == ["dummy", "decoys"]  # publish is the last stage
    assert protect.defence_json(steps) == (
        '{"protect": [{"name": "dummy", "m": 1, "source": "noise"}, {"name": "decoys", "k": 2}]}'
    )


def test_decoy_slots_map_every_pseudonym_to_its_owner() -> None:
    keys = {"d0": bytes(32), "d1": bytes(range(32))}
    slots = decoy_slots(keys, "run", [1, 2], 2)
    assert len(slots) == 2 * 2 * 3
    for r in (1, 2):
        for d, key in keys.items():
            real = decoy.real_slot(key, "run", r, 2)
            for i in range(3):
                s = slots[(r, decoy.pseudonym(key, "run", r, i))]
                assert (s.owner, s.real) == (d, i == real)


def test_live_decoy_run_defence_ledger_and_leak_scoring(
    mosquitto: BrokerAddress, lenet_artifact: ModelArtifact, tmp_path: Path
) -> None:
    k, devices = 2, 2
    cfg = ExperimentConfig(
        devices=devices, rounds=1, algorithm="fedsgd", batch_size=1, protect=f"decoys:k={k}",
        attack="inverting_gradients", attack_iterations=2, attack_max=devices * (k + 1),
        workers=1,
    )  # fmt: skip
    res = run_experiment(
        cfg, tmp_path, broker_url=mosquitto.url, progress=False, artifact=lenet_artifact
    )
    run = res.run
    db = sqlite3.connect(tmp_path / "run.db")
    kinds = dict(
        db.execute(
            "SELECT kind, COUNT(*) FROM messages WHERE run=? AND direction='up' GROUP BY kind",
            (run,),
        ).fetchall()
    )
    assert kinds == {"update": devices, "decoy": devices * k, "status": devices}
    assert res.summary["protect"] == "decoys:k=2"
    # Every update on the wire says what was applied, real and decoy alike.
    capture = CaptureStore(tmp_path / "capture")
    ids = [i for (i,) in capture.db.execute("SELECT id FROM captures WHERE channel='update'")]
    assert len(ids) == devices * (k + 1)
    for i in ids:
        meta = read_header(capture.payload(i))[1]
        assert meta["defence"] == '{"protect": [{"name": "decoys", "k": 2}]}'
        assert meta["device"] != "d0000" and meta["device"] != "d0001"
    task = capture.db.execute("SELECT id FROM captures WHERE channel='task' LIMIT 1").fetchone()
    assert read_header(capture.payload(task[0]))[1]["protect"] == "decoys:k=2"
    capture.close()
    # The leakage rows carry each pseudonym's owner and kind, recomputed from OUT/keys.
    keys = {p.stem: decoy.load_key(p) for p in (tmp_path / "keys").glob("*.key")}
    slots = decoy_slots(keys, run, [1], k)
    rows = res.summary["attack"]
    assert len(rows) == devices * (k + 1)
    for r in rows:
        slot = slots[(1, r["device"])]
        assert (r["owner"], r["real"]) == (slot.owner, slot.real)
    # Per run: the real fraction and the best PSNR on the real images, recomputed here.
    data = load_dataset("fashion-mnist")
    truth = {t["device"]: t for t in read_truth(tmp_path / "truth")}
    assert set(truth) == {"d0000", "d0001"} and all(t["seconds"] > 0 for t in truth.values())
    targets = np.concatenate([data.x_train[truth[d]["examples"][:1]] for d in sorted(truth)])
    recs = np.concatenate(
        [np.load(tmp_path / "attack" / f"r001-{r['device']}-inverting_gradients.npz")["images"]
         for r in rows]
    )  # fmt: skip
    (leak,) = res.summary["decoy_leakage"]
    assert (leak["updates"], leak["real_updates"], leak["targets"]) == (6, 2, 2)
    assert leak["real_fraction"] == 2 / 6
    best = float(psnr_matrix(recs, targets).max(axis=0).mean())
    assert leak["best_psnr_real"] == pytest.approx(best, rel=1e-12)
    base = mean_image_psnr(targets, data.x_train.mean(axis=0))
    assert leak["baseline_psnr"] == pytest.approx(base, rel=1e-12)
