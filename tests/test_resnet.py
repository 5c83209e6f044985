"""The residual net: its ONNX gradient graph trains like eager PyTorch (GroupNorm and the
residual sums included), and its gradients leak labels like the shallow nets'."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from attacks import get_attack
from attacks.base import AttackMetadata
from attacks.model import FunctionalModel, InputMap, manifest_for
from attacks.truth.victim import simulate_update
from edge.backends import load_backend
from edge.manifest import ModelArtifact
from export import export_model, zoo

TOL = 1e-5
SHAPE = (3, 32, 32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return export_model("resnet", tmp_path_factory.mktemp("resnet"), seed=0)


def test_resnet_is_deep_and_batch_independent() -> None:
    model = zoo.build("resnet")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 12  # stem, 4 blocks x 2, 3 projection shortcuts
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 308_826
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():  # one example's output does not depend on the rest of the batch
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-6)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
@pytest.mark.parametrize("batch", [1, 8])
def test_resnet_gradients_match_eager(artifact: ModelArtifact, runtime: str, batch: int) -> None:
    m = artifact.manifest
    model = zoo.build(m.model, m.input_shape, m.num_classes)
    model.load_state_dict({k: torch.tensor(v) for k, v in artifact.initial_params().items()})
    rng = np.random.default_rng(batch)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    got = load_backend(runtime, artifact).loss_and_grad(artifact.initial_params(), x, y)
    assert abs(got.loss - loss.item()) <= TOL * max(1.0, loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None
        assert np.abs(got.grads[name] - p.grad.numpy()).max() <= TOL, name


def test_resnet_grad_graph_is_standard_onnx(artifact: ModelArtifact) -> None:
    model = onnx.load(str(artifact.path("onnx_grad")))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not any("backward" in t.lower() or t in ("ATen", "PythonOp") for t in ops), ops
    assert model.graph.input[len(artifact.manifest.params)].type.tensor_type.shape.dim[0].dim_param


def _update(
    batch: int, seed: int
) -> tuple[object, dict[str, np.ndarray], AttackMetadata, np.ndarray]:
    torch.manual_seed(0)
    module = zoo.build("resnet")
    meta = AttackMetadata(manifest_for("resnet", module, SHAPE, 10), budget_s=600)
    victim = FunctionalModel(module, InputMap.from_metadata(meta, torch.device("cpu")))
    weights = {k: v.detach().numpy().copy() for k, v in module.named_parameters()}
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *SHAPE), dtype=np.float32)
    y = np.array([3, 1, 4, 1, 5, 9, 2, 6][:batch], dtype=np.int64)
    return simulate_update(victim, weights, x, y), weights, meta, y


def test_idlg_recovers_the_label_through_the_deep_net() -> None:
    for seed in range(3):
        update, weights, meta, y = _update(1, seed)
        rec = get_attack("idlg").reconstruct(update, weights, meta)
        assert rec.labels is not None and rec.labels.tolist() == y.tolist()


def test_label_counts_at_b8_through_the_deep_net() -> None:
    update, weights, meta, y = _update(8, 0)
    rec = get_attack("label_count").reconstruct(update, weights, meta)
    assert rec.labels is not None
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())
