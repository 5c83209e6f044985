"""Offline datasets, partitions and the experiment config's error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from devices.datasets import FASHION_MNIST_DIR, load_dataset
from devices.partition import dirichlet, iid
from edge.data import load_shard, save_shard
from edgeleak.config import ConfigError, ExperimentConfig


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="apt-get install -y dataset-fashion-mnist"
)
def test_fashion_mnist_from_debian() -> None:
    d = load_dataset("fashion-mnist")
    assert d.x_train.shape == (60_000, 1, 28, 28) and d.x_test.shape == (10_000, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert np.bincount(d.y_train).tolist() == [6000] * 10


def test_mnist_digits_fallback_set() -> None:
    d = load_dataset("mnist-digits")
    assert len(d.x_train) + len(d.x_test) == 5000 and d.num_classes == 10


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ValueError, match="fashion-mnist, mnist-digits"):
        load_dataset("cifar10")


def test_iid_is_a_seeded_partition() -> None:
    shards = iid(103, 10, seed=1)
    allidx = np.concatenate(shards)
    assert sorted(allidx.tolist()) == list(range(103))
    assert {len(s) for s in shards} == {10, 11}
    assert all((a == b).all() for a, b in zip(shards, iid(103, 10, seed=1), strict=True))


def test_dirichlet_skews_labels_and_covers_everything() -> None:
    labels = np.repeat(np.arange(10), 100)
    shards = dirichlet(labels, 10, alpha=0.1, seed=0, min_size=5)
    assert sorted(np.concatenate(shards).tolist()) == list(range(1000))
    assert min(len(s) for s in shards) >= 5
    # With alpha=0.1 most devices hold mostly one or two classes.
    dominant = [np.bincount(labels[s], minlength=10).max() / len(s) for s in shards]
    assert np.median(dominant) > 0.5
    wide = dirichlet(labels, 10, alpha=100.0, seed=0)
    assert np.median([np.bincount(labels[s], minlength=10).max() / len(s) for s in wide]) < 0.25


def test_shard_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 1, 28, 28)).astype(np.float32)
    y = np.arange(5)
    save_shard(tmp_path / "s.npz", x, y)
    x2, y2 = load_shard(tmp_path / "s.npz")
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ValueError, match="arrays 'x' and 'y'"):
        load_shard(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "model",
            "resnet50",
            "model='resnet50': expected one of mlp, lenet_zhu, lenet, convnet, resnet, keyboard",
        ),
        ("algorithm", "fedprox", "algorithm='fedprox': expected one of fedsgd, fedavg"),
        ("runtime", "onnx,tflite", "runtime='tflite': expected one of onnx, torch, executorch"),
        ("devices", 0, "devices=0: expected an integer >= 1"),
        ("fraction", 1.5, "fraction=1.5: expected a number in (0, 1]"),
        ("lr", -1.0, "lr=-1.0: expected a number > 0"),
        (
            "codec",
            "topk:2",
            "codec='topk:2': expected f32, f16, int8, int8c, topk:F or "
            "topk:F+int8 (F in (0, 1], e.g. topk:0.01+int8)",
        ),
        ("decoys", -1, "decoys=-1: expected an integer in 0..32"),
        ("decoys", 33, "decoys=33: expected an integer in 0..32"),
    ],
)
def test_bad_config_names_field_and_allowed_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({field: value})
    assert str(e.value) == message


def test_config_file_unknown_field(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"devices": 5, "rouns": 3}))
    with pytest.raises(
        ConfigError, match=r"unknown config field\(s\) \['rouns'\]; valid fields: devices, rounds"
    ):
        ExperimentConfig.from_file(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"devices": "5"}))
    with pytest.raises(ConfigError, match="devices='5': expected type int"):
        ExperimentConfig.from_file(tmp_path / "d.json")
    (tmp_path / "e.json").write_text(json.dumps({"devices": 5, "lr": 1}))
    assert ExperimentConfig.from_file(tmp_path / "e.json").lr == 1.0
    (tmp_path / "f.json").write_text(json.dumps({"codec": "topk:0.01+int8", "decoys": 3}))
    cfg = ExperimentConfig.from_file(tmp_path / "f.json")
    assert (cfg.codec, cfg.decoys) == ("topk:0.01+int8", 3)
