"""Robbing the Fed (Fowl et al., ICLR 2022): a dishonest server imprints examples into an update.

The server puts an imprint block in front of the model: ``Linear(D, k)`` whose k rows all
compute one brightness measure ``m(x)`` (the mean of the model input) with biases ``-t_i`` at k
quantiles of the measure's distribution, a ReLU, then ``Linear(k, D)`` with identical columns
``c`` added to the input (a residual). Bin i fires for examples with ``m(x) > t_i`` and every
firing bin passes the same ``delta_j = c . dL/dy_j`` back, so for consecutive thresholds

    (dW_i - dW_{i+1}) / (db_i - db_{i+1}) = x_j

exactly when one example j falls between ``t_i`` and ``t_{i+1}``. With k bins and B examples
spread evenly, about ``(1 - 1/k)^(B-1)`` of them are alone in their bin (paper: k=128 gives
89% at B=8, 64% at B=32).

How subtle the change is:
- Outputs barely move: the block adds ``c * sum_i relu(m(x) - t_i)`` to the input and ``c`` can
  be tiny (``1e-4`` here); the ratio above does not depend on its size, so accuracy and loss
  curves look normal.
- On the wire it is just weights: for a model that already starts with a linear layer (the zoo's
  ``mlp``) the same imprint is planted by setting that layer's rows and biases, with no change to
  the architecture or the manifest's layout. Here the block is new parameters in front of the
  model, which a device that pins the architecture (the manifest hash it was deployed with)
  refuses (the block itself: ``attacks.imprint_model``).
- What gives it away is structure, not size: a rank-one first layer whose biases form an
  ordered ladder. A client can check for that before training; nothing in the update shows it.
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
    Recovered,
    UpdateKind,
    first_linear,
    inputs_to_images,
)
from edge.manifest import Manifest


def brightness(images: np.ndarray, metadata: AttackMetadata) -> np.ndarray:
    """The imprint measure of images in [0, 1]: the mean of the model input, per example."""
    scale, shift = metadata.affine()
    inputs = images * scale[:, None, None] + shift[:, None, None]
    return inputs.reshape(len(images), -1).mean(axis=1)


def bin_differences(
    weight_grad: np.ndarray, bias_grad: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dW differences [k, D], db differences [k], bin order) between consecutive thresholds.

    Bins are ordered by threshold ``-bias`` ascending; the last bin is compared with nothing.
    """
    order = np.argsort(-bias.astype(np.float64), kind="stable")
    dw = weight_grad[order].astype(np.float64)
    db = bias_grad[order].astype(np.float64)
    dw_diff = dw - np.vstack([dw[1:], np.zeros_like(dw[:1])])
    db_diff = db - np.append(db[1:], 0.0)
    return dw_diff, db_diff, order


def imprinted_inputs(
    weight_grad: np.ndarray, bias_grad: np.ndarray, bias: np.ndarray, *, rel_tol: float = 1e-6
) -> np.ndarray:
    """The model inputs [m, D] read off an imprint's rows: one per bin whose bias-gradient
    difference is above ``rel_tol`` of the largest (the others are empty)."""
    dw, db, _ = bin_differences(weight_grad, bias_grad, bias)
    full = np.abs(db) > rel_tol * np.abs(db).max(initial=0.0)
    return dw[full] / db[full, None]


@dataclass(frozen=True)
class ImprintConfig:
    """``rel_tol``: bins whose bias-gradient difference is below this fraction of the largest
    are empty."""

    rel_tol: float = 1e-6


class ImprintAttack(BaseAttack):
    """Recover examples from the imprint block's gradient (the model must start with one)."""

    name: ClassVar[str] = "imprint"
    kinds: ClassVar[tuple[UpdateKind, ...]] = ("gradient",)

    def __init__(self, config: ImprintConfig | None = None) -> None:
        self.config = config or ImprintConfig()

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
        inputs = imprinted_inputs(
            update.params[w_name], update.params[b_name], global_model[b_name],
            rel_tol=self.config.rel_tol,
        )  # fmt: skip
        shape = metadata.manifest.input_shape
        pixels = inputs_to_images(inputs.reshape(-1, *shape), metadata, clip=False)
        return Recovered(np.clip(pixels, 0.0, 1.0), None, in_range_fraction(pixels))


def in_range_fraction(pixels: np.ndarray, *, tol: float = 1e-3) -> np.ndarray:
    """Per image, the fraction of pixels within [0, 1]: a mix of examples whose gradients have
    opposite signs leaves the range, a single example never does."""
    inside = (pixels >= -tol) & (pixels <= 1 + tol)
    return inside.reshape(len(pixels), -1).mean(axis=1).astype(np.float32)
