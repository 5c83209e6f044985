"""The honest client, simulated on true images: what it would send (for benches and tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np
import torch

from attacks.base import Algorithm, AttackUpdate, UpdateKind
from attacks.model import FunctionalModel, to_arrays, to_weights
from edge import wire


def simulate_update(
    model: FunctionalModel,
    global_model: Mapping[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    algorithm: Algorithm = "fedsgd",
    lr: float = 0.1,
    epochs: int = 1,
    batch_size: int = 0,
    orders: Sequence[Sequence[int]] = (),
) -> AttackUpdate:
    """What an honest client sends for ``images``/``labels`` (the victim's side, for benches).

    FedSGD: the mean gradient of the whole batch. FedAvg: the delta after ``epochs`` epochs of
    consecutive minibatches of ``batch_size`` (0: the whole batch) at ``lr``, visiting the
    examples in ``orders`` per epoch (default: as given).
    """
    device = model.input_map.scale.device
    update = AttackUpdate(
        params={},
        kind=cast(UpdateKind, wire.UPDATE_KIND[algorithm]),
        num_examples=len(images),
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        algorithm=algorithm,
    )
    w = {k: v.requires_grad_(True) for k, v in to_weights(global_model, device).items()}
    x = torch.tensor(np.ascontiguousarray(images), dtype=torch.float32, device=device)
    y = torch.tensor(np.ascontiguousarray(labels), dtype=torch.int64, device=device)
    params = to_arrays(model.update(w, x, y, update, orders=orders))
    return dataclasses.replace(update, params=params)
