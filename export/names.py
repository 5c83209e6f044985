"""Names of the zoo's models and the export targets, importable without torch (for ``--help``
and config validation); ``export.zoo`` and ``export.onnx_export`` check that they match."""

from __future__ import annotations

MODELS: tuple[str, ...] = ("mlp", "lenet_zhu", "lenet", "convnet", "resnet", "keyboard")
TARGETS: tuple[str, ...] = ("onnx", "executorch")
