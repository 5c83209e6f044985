"""The model zoo: small float32 classifiers that the attacks and the devices share.

Every model is ``nn.Sequential(features, flatten, classifier)``, so parameter names are
``features.<i>.weight`` / ``classifier.<i>.bias`` (torch ``state_dict`` names). Initialisation is
torch's default and therefore deterministic under ``torch.manual_seed``.

- ``mlp``: flatten, Linear(in, 256), ReLU, Linear(256, classes). The first layer is linear with a
  bias, so one example's input is recoverable analytically from its gradient. Default (1, 28, 28).
- ``lenet_zhu``: the sigmoid LeNet of DLG (Zhu et al., NeurIPS 2019) and Inverting Gradients
  (Geiping et al., NeurIPS 2020): three 5x5 convolutions with 12 channels (stride 2, 2, 1; padding
  2) each followed by a sigmoid, then one linear layer. Default (1, 28, 28); (3, 32, 32) for
  CIFAR-like images.
- ``lenet``: the ReLU LeNet-5 (LeCun et al. 1998) with max-pooling for (1, 28, 28):
  conv 6 (padding 2), pool, conv 16, pool, fc 400-120-84-classes.
- ``convnet``: a small ConvNet for (3, 32, 32): conv 32 and conv 64 (3x3, padding 1), each with
  ReLU and 2x2 max-pooling, then one linear layer (about 60k parameters).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from export.names import MODELS

Shape = tuple[int, ...]


def _net(features: list[nn.Module], classifier: list[nn.Module]) -> nn.Sequential:
    """The common layout: ``features``, flatten, ``classifier``."""
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*features),
            flatten=nn.Flatten(),
            classifier=nn.Sequential(*classifier),
        )
    )


def _flat_size(features: list[nn.Module], input_shape: Shape) -> int:
    """Number of features after ``features`` for one example of ``input_shape``."""
    with torch.no_grad():
        return int(nn.Sequential(*features)(torch.zeros(1, *input_shape)).numel())


def _mlp(input_shape: Shape, num_classes: int) -> nn.Sequential:
    n_in = _flat_size([], input_shape)
    return _net([], [nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, num_classes)])


def _lenet_zhu(input_shape: Shape, num_classes: int) -> nn.Sequential:
    c = input_shape[0]
    features: list[nn.Module] = [
        nn.Conv2d(c, 12, kernel_size=5, stride=2, padding=2),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, kernel_size=5, stride=2, padding=2),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, kernel_size=5, stride=1, padding=2),
        nn.Sigmoid(),
    ]
    return _net(features, [nn.Linear(_flat_size(features, input_shape), num_classes)])


def _lenet(input_shape: Shape, num_classes: int) -> nn.Sequential:
    features: list[nn.Module] = [
        nn.Conv2d(input_shape[0], 6, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]
    n_flat = _flat_size(features, input_shape)
    classifier: list[nn.Module] = [
        nn.Linear(n_flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    ]
    return _net(features, classifier)


def _convnet(input_shape: Shape, num_classes: int) -> nn.Sequential:
    features: list[nn.Module] = [
        nn.Conv2d(input_shape[0], 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]
    return _net(features, [nn.Linear(_flat_size(features, input_shape), num_classes)])


_BUILDERS: dict[str, tuple[Callable[[Shape, int], nn.Sequential], Shape]] = {
    "mlp": (_mlp, (1, 28, 28)),
    "lenet_zhu": (_lenet_zhu, (1, 28, 28)),
    "lenet": (_lenet, (1, 28, 28)),
    "convnet": (_convnet, (3, 32, 32)),
}

if tuple(_BUILDERS) != MODELS:  # export.names is the list that --help and configs read
    raise ImportError(f"export.names.MODELS {MODELS} differs from the zoo {tuple(_BUILDERS)}")


def _entry(name: str) -> tuple[Callable[[Shape, int], nn.Sequential], Shape]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return _BUILDERS[name]


def default_input_shape(name: str) -> Shape:
    """The input shape (C, H, W) that model ``name`` is built for when none is given."""
    return _entry(name)[1]


def build(name: str, input_shape: Shape | None = None, num_classes: int = 10) -> nn.Module:
    """A freshly initialised float32 model ``name`` for ``input_shape`` (default per model)."""
    builder, default_shape = _entry(name)
    return builder(tuple(input_shape or default_shape), num_classes).float()
