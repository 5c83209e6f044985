"""A dishonest coordinator: it changes only the weights it ships, never the architecture.

``plant_permutation`` changes no value at all: it permutes the entries of each row of the first
linear layer, so that every row keeps exactly the numbers an honest initialisation drew (its
histogram, norm and mean are unchanged) while the unit fires for few inputs. The rows put their
most negative weights on the pixels that public images light up most, mixed with a random
order per row so that units fire for different examples; how much of each is calibrated on
public images (the test split) until a unit fires for about ``fire`` of them. With ``fire`` = 1/B
most firing units see one example of a batch alone, and ``attacks.analytic`` reads those
examples off exactly (the seed's "dishonesties can be as subtle as permuting some network
parameters"). A check of weight statistics sees nothing; only the correlation of every row
with the pixels' mean brightness gives it away.

``plant_imprint`` turns a model that starts with ``Linear -> ReLU -> Linear`` (the zoo's ``mlp``)
into a Robbing-the-Fed imprint (Fowl et al. 2022; see ``attacks.imprint``) by rewriting values
in place: ``bins`` rows of the first layer all measure the mean pixel, with an ordered ladder of
biases at quantiles of that measure; the other rows never fire; the second layer's columns for
the bins are one shared vector. The manifest, the parameter names and shapes, the message sizes,
the content hash of the artifacts the device runs: all unchanged. A device sees new weights, as it
does every round. What gives it away is only the structure of those weights (a rank-one first
layer with a bias ladder), which a device would have to inspect before training.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from attacks.base import NotApplicable, first_linear
from edge.manifest import Manifest
from edge.wire import Params


def quantile_thresholds(mean: float, std: float, bins: int) -> np.ndarray:
    """``bins`` ascending thresholds at the ``i / (bins + 1)`` quantiles of N(mean, std^2)."""
    q = np.arange(1, bins + 1) / (bins + 1)
    return (mean + std * ndtri(q)).astype(np.float64)


def second_linear(manifest: Manifest) -> str:
    """Name of the weight of the layer right after the first linear layer."""
    w0, _ = first_linear(manifest)
    hidden = manifest.shapes()[w0][0]
    for spec in manifest.params[2:]:
        if len(spec.shape) == 2 and spec.shape[1] == hidden:
            return spec.name
    raise NotApplicable(
        f"model {manifest.model!r}: no linear layer reads the first layer's {hidden} outputs"
    )


def plant_imprint(
    weights: Params, manifest: Manifest, *, bins: int, mean: float, std: float, seed: int = 0
) -> Params:
    """Weights with an imprint of ``bins`` bins planted; brightness ~ N(mean, std^2) sets the ladder."""
    w0, b0 = first_linear(manifest)
    w1 = second_linear(manifest)
    hidden, n_in = manifest.shapes()[w0]
    if not 1 <= bins <= hidden:
        raise ValueError(f"bins={bins}: the first layer has {hidden} rows; use 1..{hidden}")
    out = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
    out[w0][:bins] = 1.0 / n_in  # every bin measures the mean pixel
    out[w0][bins:] = 0.0
    out[b0][:bins] = -quantile_thresholds(mean, std, bins)
    out[b0][bins:] = -1.0  # rows past the bins never fire (the mean pixel is at most 1)
    shared = np.random.default_rng(seed).standard_normal((out[w1].shape[0], 1), dtype=np.float32)
    out[w1][:, :bins] = 0.1 * shared
    out[w1][:, bins:] = 0.0
    return out


def permuted_rows(sorted_rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each row's values (ascending in ``sorted_rows``) placed in the ascending order of that
    row's ``keys``: the smallest value where the key is smallest."""
    out = np.empty_like(sorted_rows)
    np.put_along_axis(out, np.argsort(keys, axis=1, kind="stable"), sorted_rows, axis=1)
    return out


def plant_permutation(
    weights: Params,
    manifest: Manifest,
    *,
    public: np.ndarray,
    fire: float,
    seed: int = 0,
    steps: int = 20,
) -> Params:
    """Weights whose first layer's rows are permuted (nothing else changes) so that a unit
    fires for about ``fire`` of the ``public`` model inputs [N, D] (bisection, ``steps``)."""
    w0, b0 = first_linear(manifest)
    if not 0.0 < fire < 1.0:
        raise ValueError(f"fire={fire}: expected a fraction of inputs in (0, 1)")
    out = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
    w, b = out[w0], out[b0].astype(np.float64)
    x = public.reshape(len(public), -1).astype(np.float64)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"public inputs have {x.shape[1]} features; the layer reads {w.shape[1]}")
    mean = x.mean(axis=0)
    bright = (mean - mean.mean()) / (mean.std() or 1.0)  # the pixels public images light up
    noise = np.random.default_rng(seed).standard_normal(w.shape)
    values = np.sort(w, axis=1)

    def rows(alpha: float) -> np.ndarray:
        return permuted_rows(values, (1.0 - alpha) * noise - alpha * bright)

    def rate(alpha: float) -> float:
        return float(((x @ rows(alpha).T.astype(np.float64) + b) > 0).mean())

    lo, hi = 0.0, 1.0  # alpha 0: a random permutation (an honest-looking layer); 1: the sparsest
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > fire else (lo, mid)
    out[w0] = rows(hi)
    return out
