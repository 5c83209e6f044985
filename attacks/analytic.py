"""Analytic inversion of a fully connected first layer (Phong et al. 2017; Geiping et al. 2020).

For one example, a linear layer ``z = W x + b`` has ``dL/dW_i = (dL/dz_i) x`` and
``dL/db_i = dL/dz_i``, so every row with a non-zero bias gradient gives ``x = dL/dW_i / dL/db_i``
exactly up to float32 rounding. When the layer is the model's first (the zoo's ``mlp``), ``x``
is the model input, and undoing the input normalisation gives the image. For a batch the same
ratio is a ``dL/dz_i``-weighted mix of the examples: returned as one image, low confidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attacks.base import (
    AttackMetadata,
    AttackUpdate,
    BaseAttack,
    Deadline,
    NotApplicable,
    Recovered,
    UpdateKind,
    first_linear,
    inputs_to_images,
)
from attacks.labels import recover_labels
from edge.manifest import Manifest


def linear_input(
    weight_grad: np.ndarray, bias_grad: np.ndarray, *, rel_tol: float = 1e-3
) -> np.ndarray:
    """The input of a linear layer from its gradients: rows weighted by their bias gradient.

    The least-squares fit of ``dW_i = db_i x`` over the rows with ``|db_i|`` above ``rel_tol``
    of the largest: ``x = sum_i db_i dW_i / sum_i db_i^2``.
    """
    db = bias_grad.astype(np.float64)
    keep = np.abs(db) >= rel_tol * np.abs(db).max()
    if not keep.any():
        raise NotApplicable("all bias gradients are zero: the layer saw no signal")
    dw = weight_grad[keep].astype(np.float64)
    return (db[keep] @ dw) / (db[keep] @ db[keep])


@dataclass(frozen=True)
class AnalyticConfig:
    """``rel_tol``: rows with a bias gradient below this fraction of the largest are ignored."""

    rel_tol: float = 1e-3


class AnalyticAttack(BaseAttack):
    """Recover the input of a first linear layer exactly from one example's gradient."""

    name: ClassVar[str] = "analytic"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient",)

    def __init__(self, config: AnalyticConfig | None = None) -> None:
        self.config = config or AnalyticConfig()

    def needs(self, update: AttackUpdate, manifest: Manifest) -> None:
        first_linear(manifest)

    def run(
        self,
        update: AttackUpdate,
        global_model: Mapping[str, np.ndarray],
        metadata: AttackMetadata,
        deadline: Deadline,
    ) -> Recovered:
        w_name, b_name = first_linear(metadata.manifest)
        x = linear_input(update.params[w_name], update.params[b_name], rel_tol=self.config.rel_tol)
        image = inputs_to_images(x.reshape(metadata.manifest.input_shape), metadata)
        one = update.num_examples == 1
        labels = recover_labels(update, global_model, metadata)[0][:1] if one else None
        conf = 1.0 if one else 1.0 / update.num_examples
        return Recovered(image[None], labels, np.array([conf], dtype=np.float32))
