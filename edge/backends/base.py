"""The backend contract: one SGD-ready step of a model on a device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge.wire import Params


@dataclass(frozen=True)
class StepResult:
    """Loss (mean cross-entropy over the batch), logits and one gradient per parameter."""

    loss: float
    logits: np.ndarray
    grads: Params


class Backend(Protocol):
    """A training runtime. Parameters come in with every call, so one backend serves many devices."""

    name: str

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> StepResult:
        """Forward + backward on one batch (x float32 [B, *input_shape], y int64 [B])."""
        ...

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        """Forward only: logits float32 [B, num_classes]."""
        ...
