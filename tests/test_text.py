"""The keyboard model: tokeniser and corpus, export parity (the embedding's scatter-add), the
words and windows its updates leak, and the next-word metrics."""

from __future__ import annotations

import html
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from attacks.base import AttackMetadata, AttackUpdate, NotApplicable
from attacks.model import FunctionalModel, InputMap, manifest_for
from attacks.registry import get_attack
from attacks.text import TextReconstruction
from attacks.truth.text import rouge_n, score, sentence, text_table
from attacks.truth.victim import simulate_update
from coordinator.evaluate import top_k_accuracy
from devices.datasets import CONTEXT, FORTUNES_DIR, VOCAB_SIZE, load_dataset
from devices.partition import partition
from edge import text
from edge.backends import load_backend
from edge.manifest import ModelArtifact
from edgeleak.claims import NOT_TESTED, claims, preset
from edgeleak.sweep import SweepStore, ingest
from export import export_model, zoo
from export.cache import cached_export

TOL = 1e-5
V = 300  # a small vocabulary keeps the export quick; the layout is the same as with 2,000
needs_fortunes = pytest.mark.skipif(
    not FORTUNES_DIR.is_dir(), reason="apt-get install -y fortunes (Debian's fortune files)"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vocab() -> tuple[str, ...]:
    return text.SPECIALS + tuple(f"w{i}" for i in range(V - 2))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, vocab: tuple[str, ...]) -> ModelArtifact:
    return cached_export(
        "keyboard",
        tmp_path_factory.mktemp("keyboard"),
        num_classes=V,
        targets=("onnx", "executorch"),
        vocab=vocab,
    )


def _eager(artifact: ModelArtifact) -> torch.nn.Module:
    m = artifact.manifest
    model = zoo.build(m.model, m.input_shape, m.num_classes)
    model.load_state_dict({k: torch.tensor(v) for k, v in artifact.initial_params().items()})
    return model


# -- tokeniser and windows -------------------------------------------------------------------


def test_tokenize_keeps_lowercase_words_and_inner_apostrophes() -> None:
    assert text.tokenize("Don't PANIC!  42 is\tthe a_b\nanswer.") == [
        "don't", "panic", "is", "the", "a", "b", "answer",
    ]  # fmt: skip
    assert text.tokenize("b\x08bold") == ["bold"]  # overstriking is dropped


def test_vocab_ranks_by_frequency_then_alphabet() -> None:
    v = text.build_vocab([["b", "a", "c", "b"], ["c", "d"]], 5)
    assert v == ("<unk>", "<s>", "b", "c", "a")
    assert text.encode(["c", "zzz", "b"], v).tolist() == [3, 0, 2]
    with pytest.raises(ValueError, match="need more than 2"):
        text.build_vocab([], 2)


def test_windows_pad_with_bos_and_end_with_bos() -> None:
    x, y = text.windows(np.array([5, 6, 7]), 2)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.tolist() == [[1, 1], [1, 5], [5, 6], [6, 7]]
    assert y.tolist() == [5, 6, 7, 1]


def test_vocab_round_trip_and_bad_file(tmp_path: Path) -> None:
    text.save_vocab(tmp_path / "v.json", ("<unk>", "<s>", "café"))
    assert text.load_vocab(tmp_path / "v.json") == ("<unk>", "<s>", "café")
    (tmp_path / "bad.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="starts with"):
        text.load_vocab(tmp_path / "bad.json")


# -- export: the same parity as the image models ------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnx", "torch", "executorch"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_keyboard_gradients_match_eager(artifact: ModelArtifact, runtime: str, batch: int) -> None:
    backend = load_backend(runtime, artifact)
    model = _eager(artifact)
    params = artifact.initial_params()
    rng = np.random.default_rng(batch)
    # Ids from a small range: words repeat within and across windows, so the embedding's
    # backward must add (scatter-add), not overwrite.
    x = rng.integers(0, 20, (batch, CONTEXT)).astype(np.float32)
    y = rng.integers(0, V, batch)
    model.zero_grad()
    logits = model(torch.from_numpy(x))
    loss = F.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    got = backend.loss_and_grad(params, x, y)
    assert abs(got.loss - loss.item()) <= TOL * max(1.0, loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None
        assert np.abs(got.grads[name] - p.grad.numpy()).max() <= TOL, name
    emb = got.grads["features.0.weight"]
    assert set(np.flatnonzero(np.any(emb != 0, axis=1))) == {int(i) for i in np.unique(x)}


def test_grad_graph_scatter_adds_the_embedding(artifact: ModelArtifact) -> None:
    model = onnx.load(str(artifact.path("onnx_grad")))
    scatters = [n for n in model.graph.node if n.op_type == "ScatterND"]
    assert [a.s for n in scatters for a in n.attribute if a.name == "reduction"] == [b"add"]


def test_vocab_ships_in_the_model_folder(artifact: ModelArtifact, vocab: tuple[str, ...]) -> None:
    assert artifact.manifest.artifacts["vocab"] == text.VOCAB_FILE
    assert text.load_vocab(artifact.path("vocab")) == vocab
    with pytest.raises(ValueError, match="a vocabulary of 3 words for 10 classes"):
        export_model("keyboard", artifact.folder / "x", vocab=("<unk>", "<s>", "a"))


def test_keyboard_takes_a_window_of_words() -> None:
    with pytest.raises(ValueError, match="window of word ids"):
        zoo.build("keyboard", (1, 28, 28))


# -- the leak -------------------------------------------------------------------------------------


def _leak(
    update: AttackUpdate, weights: dict[str, np.ndarray], artifact: ModelArtifact
) -> TextReconstruction:
    rec = get_attack("words").reconstruct(update, weights, AttackMetadata(artifact.manifest))
    assert isinstance(rec, TextReconstruction)
    return rec


def _victim(artifact: ModelArtifact) -> FunctionalModel:
    return FunctionalModel(_eager(artifact), InputMap(torch.ones(()), torch.zeros(())))


def _batch(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of distinct word streams (as a device's shuffled batch), ids >= 2."""
    rng = np.random.default_rng(seed)
    x = rng.integers(2, V, (batch, CONTEXT)).astype(np.float32)
    x[0, :3] = 1  # one window at the start of a text: <s> padding
    return x, rng.integers(1, V, batch)


def test_fedsgd_b1_device_gradient_leaks_the_exact_window(artifact: ModelArtifact) -> None:
    x, y = _batch(1, 0)
    step = load_backend("onnx", artifact).loss_and_grad(artifact.initial_params(), x, y)
    update = AttackUpdate(step.grads, "gradient", 1, 0.1, 1, 1, "fedsgd")
    rec = _leak(update, artifact.initial_params(), artifact)
    assert rec.attack == "words" and rec.images is None
    assert rec.windows.tolist() == x.astype(int).tolist()
    assert rec.labels.tolist() == y.tolist()
    assert set(rec.words.tolist()) == {*x.astype(int).ravel().tolist(), int(y[0])}
    vocab = text.load_vocab(artifact.path("vocab"))
    s = score(rec, x, y, vocab)
    assert (s.word_precision, s.word_recall, s.exact_fraction, s.rouge1, s.rouge2) == (
        1.0, 1.0, 1.0, 1.0, 1.0,
    )  # fmt: skip
    assert s.pairs[0][0] == s.pairs[0][1] == " ".join(vocab[i] for i in sentence(x[0], y[0]))


@pytest.mark.parametrize("batch", [8, 16])
def test_fedsgd_batch_leaks_every_window(artifact: ModelArtifact, batch: int) -> None:
    x, y = _batch(batch, batch)
    weights = artifact.initial_params()
    update = simulate_update(_victim(artifact), weights, x, y)
    rec = _leak(update, weights, artifact)
    got = sorted(map(tuple, np.c_[rec.windows, rec.labels].tolist()))
    assert got == sorted(map(tuple, np.c_[x.astype(int), y].tolist()))


def test_fedavg_delta_leaks_the_words_not_the_order(artifact: ModelArtifact) -> None:
    x, y = _batch(8, 3)
    weights = artifact.initial_params()
    update = simulate_update(
        _victim(artifact), weights, x, y, algorithm="fedavg", lr=0.1, epochs=3, batch_size=4
    )
    rec = _leak(update, weights, artifact)
    s = score(rec, x, y, text.load_vocab(artifact.path("vocab")))
    assert (s.word_precision, s.word_recall) == (1.0, 1.0)
    assert rec.windows.shape == (0, CONTEXT) and s.exact_fraction == 0.0


def test_text_attack_refuses_other_models() -> None:
    mlp = zoo.build("mlp")
    weights = {k: v.detach().numpy() for k, v in mlp.named_parameters()}
    update = AttackUpdate(weights, "gradient", 1, 0.1, 1, 1, "fedsgd")
    meta = AttackMetadata(manifest_for("mlp", mlp, (1, 28, 28), 10))
    with pytest.raises(NotApplicable, match="keyboard model"):
        get_attack("words").reconstruct(update, weights, meta)


def test_rouge_and_topk_exact_values() -> None:
    assert rouge_n([1, 2, 3, 4], [1, 2, 3, 5], 1) == pytest.approx(0.75)
    assert rouge_n([1, 2, 3, 4], [1, 2, 3, 5], 2) == pytest.approx(2 / 3)
    assert rouge_n([7], [7], 2) == 1.0 and rouge_n([7], [8], 2) == 0.0
    assert rouge_n([], [1, 2], 1) == 0.0
    logits = np.array([[0.1, 0.5, 0.4, 0.0], [0.9, 0.0, 0.05, 0.05]], dtype=np.float32)
    y = np.array([2, 3])
    assert top_k_accuracy(logits, y, 1) == 0.0
    assert top_k_accuracy(logits, y, 2) == 0.5
    assert top_k_accuracy(logits, y, 3) == 1.0  # ties go to the lower index: 2 before 3
    table = text_table([("the cat", "the cat"), ("a dog", "")]).splitlines()
    assert table[2].split("|")[1].strip() == "the cat" and table[3].endswith("| —")


def test_partition_by_source_is_contiguous_per_source() -> None:
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    shards = partition(groups, 3, scheme="source", seed=0, groups=groups)
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]
    assert all(len(np.unique(groups[s])) <= 2 for s in shards)
    with pytest.raises(ValueError, match="needs a dataset with sources"):
        partition(groups, 3, scheme="source", seed=0)


@needs_fortunes
def test_fortunes_corpus_is_next_word_windows_per_source() -> None:
    d = load_dataset("fortunes")
    assert d.input_shape == (CONTEXT,) and d.num_classes == len(d.vocab) == VOCAB_SIZE
    assert d.vocab[:4] == ("<unk>", "<s>", "the", "a")
    assert d.groups is not None and len(d.groups) == len(d.x_train)
    assert len(d.sources) == len(np.unique(d.groups)) and "startrek" in d.sources
    # Every example continues the one before it unless a new text starts (its window is <s>s).
    x, y = d.x_train.astype(np.int64), d.y_train
    follows = (x[1:, :-1] == x[:-1, 1:]).all(axis=1) & (x[1:, -1] == y[:-1])
    starts = (x[1:] == 1).all(axis=1)
    assert (follows | starts).all()
    assert x.min() >= 0 and x.max() < VOCAB_SIZE


# -- the eavesdropper over the real broker ------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeleak.cli", *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _demo(out: Path, *extra: str) -> list[dict[str, object]]:
    _cli(
        "demo", "--model", "keyboard", "--dataset", "fortunes", "--partition", "source",
        "--attack", "words", "--rounds", "1", "--seed", "0", "--out", str(out),
        "--deadline-s", "3600", *extra,  # the deadline is a safety net: rounds end on answers
    )  # fmt: skip
    attacked: list[dict[str, object]] = json.loads((out / "summary.json").read_text())["attack"]
    return attacked


@needs_fortunes
def test_eavesdropper_reads_the_typed_words_off_the_broker(tmp_path: Path) -> None:
    out = tmp_path / "sgd"
    rows = _demo(out, "--algorithm", "fedsgd", "--devices", "2", "--fraction", "1",
                 "--batch-size", "4")  # fmt: skip
    assert sorted(str(r["device"]) for r in rows) == ["d0000", "d0001"]
    for r in rows:
        assert (r["kind"], r["examples"], r["attack"]) == ("gradient", 4, "words")
        assert (r["word_precision"], r["word_recall"]) == (1.0, 1.0)
        assert (r["exact_fraction"], r["rouge1"], r["rouge2"]) == (1.0, 1.0, 1.0)
        table = Path(str(r["text"])).read_text().splitlines()
        pairs = [line.split(" | ") for line in table if " | " in line][1:]
        assert len(pairs) == 4 and all(t.strip() == g.strip() for t, g in pairs)
    # The same capture attacked offline by `edgeleak attack`, scored by the fleet's truth.
    proc = _cli(
        "attack", "--capture", str(out / "capture"), "--model", str(out / "model"),
        "--attack", "words", "--truth", str(out / "truth"), "--dataset", "fortunes",
        "--out", str(tmp_path / "offline"),
    )  # fmt: skip
    assert "word precision 1.000, recall 1.000, exact examples 1.000" in proc.stdout
    with sqlite3.connect(out / "capture" / "capture.db") as con:
        got = con.execute("SELECT word_precision, word_recall, exact_fraction FROM leakage")
        assert got.fetchall() == [(1.0, 1.0, 1.0)] * 2
    # The run's report shows the word scores and each update's typed/recovered table.
    page = (out / "report.html").read_text()
    assert "<th>word precision</th><th>word recall</th>" in page
    found = Path(str(rows[0]["text"])).read_text().splitlines()[2]  # "recovered words (n): ..."
    assert found.startswith("recovered words") and page.count(html.escape(found)) == 1
    assert page.count("<pre>") == 2 + 1  # two text tables and the configuration
    # A sweep store keeps the word scores per point and per attacked update.
    store = SweepStore(tmp_path / "sweep.db")
    summary = json.loads((out / "summary.json").read_text())
    ingest(store.db, "p0", summary, out / "run.db")
    assert store.db.execute("SELECT word_precision, word_recall FROM results").fetchall() == [
        (1.0, 1.0)
    ]
    got = store.db.execute("SELECT device, word_recall, text FROM leakage ORDER BY device")
    by_device = sorted(rows, key=lambda r: str(r["device"]))  # rows come in arrival order
    assert got.fetchall() == [(str(r["device"]), 1.0, r["text"]) for r in by_device]


@needs_fortunes
def test_eavesdropper_reads_the_fedavg_word_set_exactly(tmp_path: Path) -> None:
    # 200 devices of about 380 windows each, 2 selected: 24 local steps of 16.
    rows = _demo(tmp_path / "avg", "--algorithm", "fedavg", "--devices", "200",
                 "--fraction", "0.01", "--batch-size", "16", "--epochs", "1")  # fmt: skip
    assert len(rows) == 2
    for r in rows:
        assert r["kind"] == "delta" and int(str(r["examples"])) > 100
        assert (r["word_precision"], r["word_recall"], r["exact_fraction"]) == (1.0, 1.0, 0.0)


def test_claim_7_runs_the_keyboard_demo_and_judges_recall() -> None:
    (c,) = [c for c in claims() if c.id == "7"]
    assert "7" not in {cid for cid, _, _ in NOT_TESTED}
    assert c.points["keyboard"]["attack"] == "words" and c.points["keyboard"]["batch_size"] == 8
    assert preset("claims").points  # every point, claim 7's included, is a valid config
    row = {"word_precision": 1.0, "word_recall": 0.9, "exact_fraction": 0.25}
    measured, verdict = c.judge({"keyboard": row})
    assert verdict == "holds"
    assert measured == "word precision 1.00, recall 0.90; windows with their next word exact 0.25"
    assert c.judge({"keyboard": {**row, "word_recall": 0.89}})[1] == "partly"
    assert c.judge({"keyboard": {**row, "word_recall": 0.0}})[1] == "does not hold"
