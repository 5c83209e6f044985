"""The dishonest server's imprint block as a torch module (Fowl et al. 2022; see
``attacks.imprint`` for the attack that reads its gradient)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


class ImprintBlock(nn.Module):
    """``x + unflatten(lin1(relu(lin0(flatten(x)))))``: k bins of one linear measure."""

    def __init__(self, input_shape: tuple[int, ...], bins: int) -> None:
        super().__init__()
        n = int(np.prod(input_shape))
        self.input_shape = tuple(input_shape)
        self.lin0 = nn.Linear(n, bins)
        self.lin1 = nn.Linear(bins, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin0(x.flatten(1)))
        return x + self.lin1(h).reshape(x.shape)


def build_imprint_model(
    base: nn.Module,
    input_shape: tuple[int, ...],
    thresholds: np.ndarray,
    *,
    residual_scale: float = 1e-4,
) -> nn.Sequential:
    """The malicious model: an imprint block with ``thresholds`` (ascending) before ``base``.

    Parameter names are ``imprint.lin0.*``, ``imprint.lin1.*`` and ``net.<base names>``.
    """
    block = ImprintBlock(input_shape, len(thresholds))
    n = int(np.prod(input_shape))
    with torch.no_grad():
        block.lin0.weight.fill_(1.0 / n)
        block.lin0.bias.copy_(torch.from_numpy(-np.asarray(thresholds, dtype=np.float32)))
        block.lin1.weight.fill_(residual_scale)
        block.lin1.bias.zero_()
    return nn.Sequential(OrderedDict(imprint=block, net=base))
