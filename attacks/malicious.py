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

``plant_loki`` ships every device a different imprint, each in its own block of rows (LOKI, Zhao
et al., IEEE S&P 2024): secure aggregation sums the gradients, but a block is non-zero in one
device's gradient only, so the sum still separates per device. Every device sees a model of the
same shape and statistics; only comparing the weights that different devices received (their
hashes) gives it away (``edge.device``'s ``verify_model``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

from attacks.base import NotApplicable, first_linear
from edge.manifest import Manifest
from edge.wire import Params


def quantile_thresholds(mean: float, std: float, bins: int, *, floor: bool = False) -> np.ndarray:
    """``bins`` ascending thresholds at the ``i / (bins + 1)`` quantiles of N(mean, std^2); with
    ``floor``, the first is 10 std below the mean (its bin fires for every input) and the other
    ``bins - 1`` at the ``i / bins`` quantiles: with few bins, no input goes unseen."""
    if floor:
        return np.r_[mean - 10 * std, quantile_thresholds(mean, std, bins - 1)]
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
    weights: Params, manifest: Manifest, *, bins: int, mean: float, std: float, seed: int = 0,
    first: int = 0, floor: bool = False,
) -> Params:  # fmt: skip
    """Weights with an imprint of ``bins`` bins planted in rows ``first`` .. ``first + bins - 1``
    of the first layer; brightness ~ N(mean, std^2) sets the ladder (``quantile_thresholds``,
    ``floor``); every other row is silent (zero weights, bias -1: it never fires, so its
    gradient is zero)."""
    w0, b0 = first_linear(manifest)
    w1 = second_linear(manifest)
    hidden, n_in = manifest.shapes()[w0]
    if not (bins >= 1 and 0 <= first and first + bins <= hidden):
        raise ValueError(
            f"bins={bins} from row {first}: the first layer has {hidden} rows; use rows 0..{hidden - 1}"
        )
    rows = slice(first, first + bins)
    out = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
    out[w0][:] = 0.0
    out[w0][rows] = 1.0 / n_in  # every bin measures the mean pixel
    out[b0][:] = -1.0  # rows outside the bins never fire (the mean pixel is at most 1)
    out[b0][rows] = -quantile_thresholds(mean, std, bins, floor=floor)
    shared = np.random.default_rng(seed).standard_normal((out[w1].shape[0], 1), dtype=np.float32)
    out[w1][:] = 0.0
    out[w1][:, rows] = 0.1 * shared
    return out


def loki_rows(manifest: Manifest, devices: int) -> int:
    """Imprint bins per device when ``devices`` share the first layer's rows in disjoint blocks."""
    hidden = manifest.shapes()[first_linear(manifest)[0]][0]
    if not 1 <= devices <= hidden:
        raise ValueError(f"{devices} devices cannot share the first layer's {hidden} rows")
    return hidden // devices


def plant_loki(
    weights: Params, manifest: Manifest, *, index: int, devices: int, mean: float, std: float
) -> Params:
    """LOKI (Zhao et al., IEEE S&P 2024): device ``index`` of ``devices`` gets an imprint in its
    own block of ``loki_rows`` rows, silent everywhere else, so that in the sum of all devices'
    gradients (what secure aggregation reveals) each block holds one device's gradient alone.
    A block's lowest bin fires for every input (``floor``): with a handful of bins per device,
    no example falls below the ladder unseen."""
    bins = loki_rows(manifest, devices)
    if not 0 <= index < devices:
        raise ValueError(f"index={index}: expected 0..{devices - 1}")
    return plant_imprint(
        weights, manifest, bins=bins, mean=mean, std=std, first=index * bins, floor=True
    )


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
