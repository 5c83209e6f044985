"""Surrogate second derivatives for ReLU and max-pooling, for attacks that differentiate a
gradient (update matching).

Gradient matching differentiates the model's parameter gradient with respect to the input. Through
a ReLU that gradient carries the step ``relu'(z) = [z > 0]``, and through a max-pool the one-hot
choice of each window's maximum: both are piecewise constant, so their derivative is zero and the
attack never learns which units would switch on or which window element would win. On the ReLU
LeNet this leaves inverting gradients stuck far from the image (the same problem as training
spiking networks, solved there the same way).

``with_surrogate_derivatives(module, tau)`` returns a copy of ``module`` in which every
``nn.ReLU`` and every ``nn.MaxPool2d`` computes exactly the same values and exactly the same
first derivatives, but whose *second* derivative replaces the step's zero by the derivative of a
sigmoid (ReLU) or of a softmax over the window (max-pool), of width ``tau`` times the standard
deviation of the layer's input. The model's gradient for the dummy images is therefore the true
one; only the direction in which the attack moves the dummy images changes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _width(z: torch.Tensor, tau: float) -> torch.Tensor:
    return tau * z.detach().std().clamp_min(1e-12) if z.numel() > 1 else z.new_tensor(tau)


class _Step(torch.autograd.Function):
    """``[z > 0]``; its derivative is a sigmoid's of width ``tau * std(z)``."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.tau = tau
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        w = _width(z, ctx.tau)
        s = torch.sigmoid(z / w)
        return g * s * (1 - s) / w, None


class _ReLU(torch.autograd.Function):
    """``max(z, 0)`` whose derivative is ``_Step``: exact, and differentiable with a surrogate."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.tau = tau
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        return g * _Step.apply(z, ctx.tau), None


class _Argmax(torch.autograd.Function):
    """One-hot of the maximum over the last dimension; its derivative is a softmax's of
    temperature ``tau * std(v)``."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.tau = tau
        return F.one_hot(v.argmax(-1), v.shape[-1]).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (v,) = ctx.saved_tensors
        finite = v.detach().isfinite()
        w = _width(v[finite], ctx.tau)
        s = torch.softmax(v / w, -1)
        return s * (g - (g * s).sum(-1, keepdim=True)) / w, None


class _Max(torch.autograd.Function):
    """Maximum over the last dimension whose derivative is ``_Argmax``."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.tau = tau
        return v.amax(-1)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (v,) = ctx.saved_tensors
        return g[..., None] * _Argmax.apply(v, ctx.tau), None


class SurrogateReLU(nn.Module):
    """``nn.ReLU`` with a sigmoid surrogate for the derivative of its step."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _ReLU.apply(z, self.tau)


class SurrogateMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no dilation, floor mode) with a softmax surrogate for the derivative of
    each window's choice of maximum."""

    def __init__(self, pool: nn.MaxPool2d, tau: float) -> None:
        super().__init__()
        self.kernel = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride or pool.kernel_size)
        self.padding = _pair(pool.padding)
        self.tau = tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
        windows = x.unfold(2, kh, sh).unfold(3, kw, sw)  # N, C, Ho, Wo, kh, kw
        return _Max.apply(windows.reshape(*windows.shape[:4], kh * kw), self.tau)


def with_surrogate_derivatives(module: nn.Module, tau: float) -> nn.Module:
    """A copy of ``module`` whose ReLUs and max-pools (no dilation, floor mode) have surrogate
    second derivatives of relative width ``tau``; the same values and first derivatives."""
    out = copy.deepcopy(module)
    for name, child in list(out.named_modules()):
        if isinstance(child, nn.ReLU):
            new: nn.Module = SurrogateReLU(tau)
        elif (
            isinstance(child, nn.MaxPool2d)
            and _pair(child.dilation) == (1, 1)
            and not child.ceil_mode
            and not child.return_indices
        ):
            new = SurrogateMaxPool2d(child, tau)
        else:
            continue
        if not name:  # the module itself
            return new
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, new)
    return out
