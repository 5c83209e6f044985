"""ExecuTorch training programs against eager PyTorch: gradients and SGD trajectories."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edge.backends.executorch import match_names

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from edge.backends.executorch import ExecuTorchBackend  # noqa: E402
from edge.manifest import Manifest, ModelArtifact, ParamSpec, content_hash  # noqa: E402
from export import zoo  # noqa: E402
from export.executorch_export import export_pte  # noqa: E402

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None,
    reason="executorch is not installed: pip install 'edgeleak[executorch]'",
)

TOL = 1e-5  # absolute, for gradients and parameters
RTOL = 1e-5  # logits and loss reach ~10: float32 summation order alone moves them by ~1e-5
LR = 0.1
STEPS = 3

torch.set_num_threads(1)

Params = dict[str, np.ndarray]


def make_artifact(
    model: nn.Module, name: str, input_shape: tuple[int, ...], folder: Path
) -> ModelArtifact:
    """Export ``model`` to ``folder/model.pte`` with a manifest naming torch's parameter names."""
    x = torch.randn(4, *input_shape)
    y = torch.arange(4) % 2
    export_pte(model, x, y, folder / "model.pte")
    with torch.no_grad():
        num_classes = int(model(x[:1]).shape[1])
    params = tuple(ParamSpec(n, tuple(p.shape)) for n, p in model.named_parameters())
    manifest = Manifest(name, input_shape, num_classes, params, {"pte": "model.pte"})
    manifest = dataclasses.replace(manifest, sha256=content_hash(manifest, folder))
    (folder / "manifest.json").write_text(manifest.to_json())
    return ModelArtifact.load(folder)


def torch_params(model: nn.Module) -> Params:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def eager_step(
    model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray, Params]:
    """Loss, logits and gradients of eager torch at ``params``."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[n]))
    model.zero_grad()
    logits = model(torch.from_numpy(x))
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), logits.detach().numpy(), grads


def max_diff(a: Params, b: Params) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def check_sgd_parity(model: nn.Module, art: ModelArtifact, batch: int, seed: int = 1) -> None:
    """Three SGD steps on both runtimes: loss, logits, gradients and parameters agree."""
    backend = ExecuTorchBackend(art)
    rng = np.random.default_rng(seed)
    shape = art.manifest.input_shape
    p_et = torch_params(model)
    p_ref = {k: v.copy() for k, v in p_et.items()}
    for step in range(STEPS):
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        y = rng.integers(0, art.manifest.num_classes, batch).astype(np.int64)
        res = backend.loss_and_grad(p_et, x, y)
        loss, logits, grads = eager_step(model, p_ref, x, y)
        assert res.grads.keys() == grads.keys(), "a parameter got no gradient"
        assert res.loss == pytest.approx(loss, rel=RTOL, abs=TOL), f"step {step}"
        np.testing.assert_allclose(res.logits, logits, atol=TOL, rtol=RTOL)
        assert max_diff(res.grads, grads) < TOL, f"step {step}: grads differ"
        assert any(np.abs(g).max() > 1e-4 for g in grads.values()), "gradients vanish: weak test"
        p_et = {k: v - LR * res.grads[k] for k, v in p_et.items()}
        p_ref = {k: v - LR * grads[k] for k, v in p_ref.items()}
        assert max_diff(p_et, p_ref) < TOL, f"step {step}: parameters differ"


ZOO_CASES = [
    ("mlp", None),
    ("lenet_zhu", (1, 28, 28)),
    ("lenet_zhu", (3, 32, 32)),
    ("lenet", None),
    ("convnet", None),
]


@pytest.fixture(
    scope="module", params=ZOO_CASES, ids=[f"{n}-{s[0] if s else 'default'}" for n, s in ZOO_CASES]
)
def zoo_artifact(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[nn.Module, ModelArtifact]:
    name, shape = request.param
    torch.manual_seed(0)
    model = zoo.build(name, shape)
    input_shape = tuple(shape or zoo.default_input_shape(name))
    return model, make_artifact(model, name, input_shape, tmp_path_factory.mktemp(name))


@needs_executorch
def test_zoo_sgd_parity_batch8(zoo_artifact: tuple[nn.Module, ModelArtifact]) -> None:
    check_sgd_parity(*zoo_artifact, batch=8)


@needs_executorch
def test_zoo_logits_and_batch_bounds(zoo_artifact: tuple[nn.Module, ModelArtifact]) -> None:
    """``logits`` equals eager; batch 1 and a batch above the program's bound (split) work."""
    model, art = zoo_artifact
    backend = ExecuTorchBackend(art)
    params = torch_params(model)
    rng = np.random.default_rng(2)
    for batch in (1, backend.max_batch + 6):
        x = rng.standard_normal((batch, *art.manifest.input_shape)).astype(np.float32)
        y = rng.integers(0, art.manifest.num_classes, batch).astype(np.int64)
        loss, logits, grads = eager_step(model, params, x, y)
        np.testing.assert_allclose(backend.logits(params, x), logits, atol=TOL, rtol=RTOL)
        res = backend.loss_and_grad(params, x, y)
        assert res.loss == pytest.approx(loss, rel=RTOL, abs=TOL)
        assert max_diff(res.grads, grads) < TOL


@needs_executorch
def test_lenet_sgd_parity_batch1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = zoo.build("lenet")
    check_sgd_parity(model, make_artifact(model, "lenet", (1, 28, 28), tmp_path), batch=1)


@needs_executorch
def test_export_model_target(tmp_path: Path) -> None:
    """``export_model(targets=("executorch",))`` gives a ``pte`` that the backend loads by name."""
    from edge.backends import load_backend
    from export import export_model

    art = export_model("lenet", tmp_path, targets=("executorch",))
    assert art.manifest.artifacts["pte"] == "model.pte"
    params = art.initial_params()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, *art.manifest.input_shape)).astype(np.float32)
    y = rng.integers(0, art.manifest.num_classes, 8).astype(np.int64)
    res = ExecuTorchBackend(art).loss_and_grad(params, x, y)
    ref = load_backend("torch", art).loss_and_grad(params, x, y)
    assert res.loss == pytest.approx(ref.loss, rel=RTOL, abs=TOL)
    assert max_diff(res.grads, ref.grads) < TOL


def _head(features: list[nn.Module], shape: tuple[int, ...]) -> nn.Sequential:
    with torch.no_grad():
        n = int(nn.Sequential(*features)(torch.zeros(1, *shape)).numel())
    return nn.Sequential(*features, nn.Flatten(), nn.Linear(n, 3))


# One small model per layer type. Every layer sits behind a parameterised one, so a wrong
# backward anywhere (ExecuTorch's max-pool backward kernel: gradients off by up to 1e2) shows up
# in the gradient of the layer before it.
LAYERS: dict[str, Callable[[], list[nn.Module]]] = {
    "linear": lambda: [nn.Flatten(), nn.Linear(2 * 8 * 8, 16)],
    "conv_stride1": lambda: [nn.Conv2d(2, 3, 3)],
    "conv_stride2_pad2": lambda: [nn.Conv2d(2, 3, 5, stride=2, padding=2)],
    "relu": lambda: [nn.Conv2d(2, 3, 3), nn.ReLU()],
    "sigmoid": lambda: [nn.Conv2d(2, 3, 3), nn.Sigmoid()],
    "maxpool_2": lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2)],
    "maxpool_3_stride2_overlap": lambda: [nn.Conv2d(2, 3, 3), nn.MaxPool2d(3, stride=2)],
    "maxpool_twice": lambda: [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.MaxPool2d(2, padding=1, ceil_mode=True),
    ],
}


@needs_executorch
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_parity(layer: str, tmp_path: Path) -> None:
    shape = (2, 8, 8)
    torch.manual_seed(3)
    model = _head(LAYERS[layer](), shape)
    check_sgd_parity(model, make_artifact(model, layer, shape, tmp_path), batch=8)


@needs_executorch
def test_backend_rejects_bad_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _head([nn.Conv2d(2, 3, 3)], (2, 8, 8))
    art = make_artifact(model, "tiny", (2, 8, 8), tmp_path)
    backend = ExecuTorchBackend(art)
    params = torch_params(model)
    x = np.zeros((2, 2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="labels must lie in"):
        backend.loss_and_grad(params, x, np.array([0, 3]))
    with pytest.raises(ValueError, match="x has shape"):
        backend.logits(params, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="has shape"):
        bad = dict(params, **{"0.bias": np.zeros(1, np.float32)})  # would broadcast in copy_
        backend.loss_and_grad(bad, x, np.array([0, 1]))
    with pytest.raises(KeyError, match="missing"):
        backend.logits({}, x)


def test_match_names() -> None:
    names = ["features.0.weight", "features.0.bias", "classifier.0.weight"]
    assert match_names([f"model.{n}" for n in names], names) == {n: f"model.{n}" for n in names}
    assert match_names(list(names), names) == {n: n for n in names}
    # "0.weight" is a suffix of both runtime names: only the common prefix decides.
    assert match_names(["m.0.weight", "m.a.0.weight"], ["0.weight", "a.0.weight"]) == {
        "0.weight": "m.0.weight",
        "a.0.weight": "m.a.0.weight",
    }
    with pytest.raises(ValueError, match="do not match the manifest"):
        match_names(["model.fc.weight", "model.fc.bias"], ["fc.weight", "other.bias"])
    with pytest.raises(ValueError, match="do not match the manifest"):
        match_names(["xfc.weight"], ["fc.weight"])
