"""Surrogate second derivatives (attacks.surrogate): the same values and first derivatives as the
model, and the stated second derivative where the model's is zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.surrogate import with_surrogate_derivatives
from export import zoo

D = torch.float64


def _param_grads(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    loss = nn.functional.cross_entropy(module(x), y)
    return list(torch.autograd.grad(loss, list(module.parameters())))


@pytest.mark.parametrize("name,shape", [("lenet", (1, 28, 28)), ("convnet", (3, 32, 32))])
def test_the_surrogate_model_has_the_models_values_and_gradients(
    name: str, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    module = zoo.build(name, shape).to(D)
    surrogate = with_surrogate_derivatives(module, 1.0)
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in surrogate.modules())
    x = torch.rand(3, *shape, dtype=D)
    y = torch.tensor([0, 3, 7])
    assert torch.equal(module(x), surrogate(x))
    for a, b in zip(_param_grads(module, x, y), _param_grads(surrogate, x, y), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def _second(layer: nn.Module, z: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d/dz <d, d/dz <c, layer(z)>>: the second derivative the attack differentiates."""
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((layer(z) * c).sum(), [z], create_graph=True)
    (h,) = torch.autograd.grad((g * d).sum(), [z])
    return h


def test_relus_second_derivative_is_a_sigmoids_of_relative_width_tau() -> None:
    torch.manual_seed(1)
    z, c, d = (torch.randn(50, dtype=D) for _ in range(3))
    assert torch.equal(_second(nn.ReLU(), z, c, d), torch.zeros_like(z))  # why it is needed
    tau = 0.5
    w = tau * z.std()
    s = torch.sigmoid(z / w)
    expected = c * d * s * (1 - s) / w
    torch.testing.assert_close(
        _second(with_surrogate_derivatives(nn.ReLU(), tau), z, c, d), expected
    )


def test_max_pools_second_derivative_is_a_softmaxs_over_each_window() -> None:
    torch.manual_seed(2)
    pool = nn.MaxPool2d(2)
    z = torch.randn(1, 1, 2, 4, dtype=D)  # two windows of four
    c, d = torch.randn(1, 1, 1, 2, dtype=D), torch.randn(1, 1, 2, 4, dtype=D)
    assert torch.equal(_second(pool, z, c, d), torch.zeros_like(z))
    tau = 2.0
    h = _second(with_surrogate_derivatives(pool, tau), z, c, d)
    w = tau * z.std()
    for k in range(2):  # window k holds columns 2k, 2k+1 of both rows
        v = z[0, 0, :, 2 * k : 2 * k + 2].reshape(-1)
        dv = d[0, 0, :, 2 * k : 2 * k + 2].reshape(-1)
        s = torch.softmax(v / w, 0)
        expected = c[0, 0, 0, k] * s * (dv - (dv * s).sum()) / w
        torch.testing.assert_close(h[0, 0, :, 2 * k : 2 * k + 2].reshape(-1), expected)


def test_a_padded_overlapping_max_pool_keeps_values_and_gradients() -> None:
    torch.manual_seed(3)
    pool = nn.MaxPool2d(3, stride=2, padding=1)
    z = torch.randn(2, 3, 9, 9, dtype=D, requires_grad=True)
    c = torch.randn(2, 3, 5, 5, dtype=D)
    surrogate = with_surrogate_derivatives(pool, 1.0)
    assert torch.equal(pool(z), surrogate(z))
    (a,) = torch.autograd.grad((pool(z) * c).sum(), [z])
    (b,) = torch.autograd.grad((surrogate(z) * c).sum(), [z])
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)  # overlaps: summed in another order


def test_dilated_or_ceil_mode_pools_are_left_as_they_are() -> None:
    module = nn.Sequential(nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, ceil_mode=True))
    kept = with_surrogate_derivatives(module, 1.0)
    assert all(isinstance(m, nn.MaxPool2d) for m in kept)
