"""Export: every zoo model's artifacts train exactly like eager PyTorch, in both backends."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from edge.backends import load_backend
from edge.manifest import Manifest, ModelArtifact
from export import TARGETS, export_model, zoo
from export.cache import CACHE_ENV, cache_dir, cached_export, export_key

# (model, input shape): every zoo model at its default shape, the sigmoid LeNet also at 3x32x32.
# The resnet's export takes minutes: tests/test_resnet.py covers it (one export, same parity).
CASES = [(name, zoo.default_input_shape(name)) for name in zoo.MODELS if name != "resnet"] + [
    ("lenet_zhu", (3, 32, 32))
]
TOL = 1e-5
LR = 0.1
STEPS = 3


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(
    scope="session", params=CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES]
)
def artifact(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ModelArtifact:
    name, shape = request.param
    return cached_export(name, tmp_path_factory.mktemp(name), input_shape=shape, seed=0)


def _eager(artifact: ModelArtifact) -> torch.nn.Module:
    """The zoo model with the artifact's initial parameters: the independent eager reference."""
    m = artifact.manifest
    model = zoo.build(m.model, m.input_shape, m.num_classes)
    model.load_state_dict({k: torch.tensor(v) for k, v in artifact.initial_params().items()})
    return model


def _batches(artifact: ModelArtifact, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless fresh batches of image-like inputs and labels, seeded by the batch size."""
    rng = np.random.default_rng(batch)
    m = artifact.manifest
    while True:
        x = rng.random((batch, *m.input_shape), dtype=np.float32)  # pixels in [0, 1)
        yield x, rng.integers(0, m.num_classes, batch, dtype=np.int64)


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
@pytest.mark.parametrize("batch", [1, 8, 32])
def test_sgd_steps_match_eager_autograd(artifact: ModelArtifact, runtime: str, batch: int) -> None:
    backend = load_backend(runtime, artifact)
    model = _eager(artifact)
    params = {k: v.copy() for k, v in artifact.initial_params().items()}
    for _, (x, y) in zip(range(STEPS), _batches(artifact, batch), strict=False):
        model.zero_grad()
        logits = model(torch.from_numpy(x))
        loss = F.cross_entropy(logits, torch.from_numpy(y))
        loss.backward()
        ref = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}

        got = backend.loss_and_grad(params, x, y)
        assert got.logits.shape == (batch, artifact.manifest.num_classes)
        # Loss: float32 resolution grows with the value (a diverging batch-1 step can reach ~20).
        assert abs(got.loss - loss.item()) <= TOL * max(1.0, abs(loss.item()))
        assert np.abs(got.logits - logits.detach().numpy()).max() <= TOL
        assert _max_diff(got.grads, ref) <= TOL
        assert all(g.dtype == np.float32 for g in got.grads.values())

        # The same SGD update on both sides, each with its own gradients.
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        params = {k: params[k] - LR * got.grads[k] for k in params}
        state = {k: v.numpy() for k, v in model.state_dict().items()}
        assert _max_diff(params, state) <= TOL


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_logits_match_eager(artifact: ModelArtifact, runtime: str) -> None:
    x, _ = next(_batches(artifact, 8))
    with torch.no_grad():
        ref = _eager(artifact)(torch.from_numpy(x)).numpy()
    got = load_backend(runtime, artifact).logits(artifact.initial_params(), x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL


def test_manifest_describes_the_model(artifact: ModelArtifact) -> None:
    m = artifact.manifest
    model = _eager(artifact)
    assert m.param_names == [k for k, _ in model.named_parameters()]
    assert m.shapes() == {k: tuple(p.shape) for k, p in model.named_parameters()}
    assert set(m.artifacts) == {"onnx_grad", "onnx_infer", "init", "pt2"}
    assert Manifest.from_json(m.to_json()) == m
    assert ModelArtifact.load(artifact.folder).manifest == m


def test_initial_params_are_the_seeded_build(artifact: ModelArtifact) -> None:
    m = artifact.manifest
    torch.manual_seed(0)
    model = zoo.build(m.model, m.input_shape, m.num_classes)
    init = artifact.initial_params()
    assert all(np.array_equal(init[k], p.detach().numpy()) for k, p in model.named_parameters())


def test_modified_artifact_fails_the_hash_check(artifact: ModelArtifact, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(artifact.folder, tmp_path / "copy"))
    grad = copy / artifact.manifest.artifacts["onnx_grad"]
    data = bytearray(grad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    grad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="content hash"):
        ModelArtifact.load(copy)
    assert ModelArtifact.load(copy, verify=False).manifest == artifact.manifest


@pytest.mark.parametrize("kind", ["onnx_grad", "onnx_infer"])
def test_onnx_graphs_use_standard_ops_only(artifact: ModelArtifact, kind: str) -> None:
    model = onnx.load(str(artifact.path(kind)))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert not model.functions
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert all(domain in ("", "ai.onnx") and onnx.defs.has(op) for domain, op in ops), ops
    x = model.graph.input[len(artifact.manifest.params)]
    assert x.name == "x"
    assert x.type.tensor_type.shape.dim[0].dim_param, "the batch dimension must be dynamic"


def test_grad_graph_has_no_torch_ops(artifact: ModelArtifact) -> None:
    path = artifact.path("onnx_grad")
    model = onnx.load(str(path))
    types = {n.op_type for n in model.graph.node}
    assert not any("backward" in t.lower() or t in ("ATen", "PythonOp") for t in types), types
    assert b"org.pytorch.aten" not in path.read_bytes()
    names = artifact.manifest.param_names
    assert [i.name for i in model.graph.input] == [*names, "x", "y"]
    assert [o.name for o in model.graph.output] == ["loss", "logits", *(f"grad.{n}" for n in names)]


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        zoo.build("resnet9000")
    assert all(name in str(err.value) for name in zoo.MODELS)
    with pytest.raises(ValueError, match="lenet_zhu"):
        zoo.default_input_shape("nope")


def test_unknown_target_lists_the_valid_targets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=", ".join(TARGETS)):
        export_model("mlp", tmp_path, targets=("tflite",))


def test_the_export_cache_exports_once_and_repairs_a_corrupt_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    a = cached_export("mlp", tmp_path / "a", seed=0)
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name == export_key("mlp", (1, 28, 28), 10, 0, ("onnx",), ())
    stamp = (entry / "grad.onnx").stat().st_mtime_ns
    b = cached_export("mlp", tmp_path / "b", seed=0)  # from the cache: nothing exported
    assert (entry / "grad.onnx").stat().st_mtime_ns == stamp
    assert a.manifest == b.manifest and (tmp_path / "b" / "grad.onnx").is_file()
    for k, v in a.initial_params().items():
        np.testing.assert_array_equal(v, b.initial_params()[k])
    # a tampered entry fails its content hash and is exported again
    (entry / "init.safetensors").write_bytes(b"\0" * 64)
    d = cached_export("mlp", tmp_path / "d", seed=0)
    assert (entry / "grad.onnx").stat().st_mtime_ns != stamp
    for k, v in a.initial_params().items():
        np.testing.assert_array_equal(v, d.initial_params()[k])
    key = export_key("mlp", (1, 28, 28), 10, 0, ("onnx",), ())
    shape = (1, 28, 28)
    for other in (("mlp", shape, 10, 1, ("onnx",), ()), ("mlp", (3, 32, 32), 10, 0, ("onnx",), ()),
                  ("mlp", shape, 10, 0, ("onnx",), ("a", "b")), ("lenet", shape, 10, 0, ("onnx",), ()),
                  ("mlp", shape, 10, 0, ("onnx", "executorch"), ())):  # fmt: skip
        assert export_key(*other) != key
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_dir() is None
