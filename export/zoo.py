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
- ``resnet``: a width-reduced ResNet-10 for (3, 32, 32) (He et al. 2016): a 3x3 stem (16
  channels), four basic residual blocks (16, 32, 64, 128 channels; stride 1, 2, 2, 2; 1x1
  projection shortcuts where the shape changes), global average pooling and one linear layer
  (about 0.3M parameters). GroupNorm (8 groups) instead of BatchNorm, so that a gradient does not
  depend on the rest of the batch and the gradient graph stays pure.
- ``keyboard``: next-word prediction over a window of ``input_shape[0]`` words (Bengio et al.
  2003): the word ids (float32, the wire's input dtype; cast to int64 inside), an embedding of
  ``num_classes`` words (the vocabulary is the class set) x 32, concatenated, a hidden layer of
  128 with ReLU, and vocabulary logits. An MLP over the window rather than a recurrent body: the
  gradient graph stays standard ONNX, and the embedding's gradient is a scatter-add into the rows
  of the words seen. Default (8,) words.
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


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: [B, C, H, W] -> [B, C] (a mean, whose backward every
    runtime has; avg-pool backward is missing in ExecuTorch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and ReLU, plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(8, c_out)
            )
            if stride != 1 or c_in != c_out
            else nn.Sequential()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet(input_shape: Shape, num_classes: int) -> nn.Sequential:
    widths = (16, 32, 64, 128)
    features: list[nn.Module] = [
        nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
        nn.GroupNorm(8, widths[0]),
        nn.ReLU(),
    ]
    c_in = widths[0]
    for i, c in enumerate(widths):
        features.append(BasicBlock(c_in, c, 1 if i == 0 else 2))
        c_in = c
    features.append(GlobalAvgPool())
    return _net(features, [nn.Linear(c_in, num_classes)])


class TokenEmbedding(nn.Embedding):
    """An embedding of word ids carried as float32 (exact up to 2**24): cast, then look up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.long())


EMBED_DIM = 32
HIDDEN = 128


def _keyboard(input_shape: Shape, num_classes: int) -> nn.Sequential:
    if len(input_shape) != 1:
        raise ValueError(f"keyboard takes a window of word ids, shape (words,); got {input_shape}")
    return _net(
        [TokenEmbedding(num_classes, EMBED_DIM)],
        [nn.Linear(input_shape[0] * EMBED_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes)],
    )


_BUILDERS: dict[str, tuple[Callable[[Shape, int], nn.Sequential], Shape]] = {
    "mlp": (_mlp, (1, 28, 28)),
    "lenet_zhu": (_lenet_zhu, (1, 28, 28)),
    "lenet": (_lenet, (1, 28, 28)),
    "convnet": (_convnet, (3, 32, 32)),
    "resnet": (_resnet, (3, 32, 32)),
    "keyboard": (_keyboard, (8,)),
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
