"""Model zoo and exporters: torch models to device artifacts plus a manifest.

``export_model`` loads torch on first use, so ``export.names`` (model and target names) imports
without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from export.names import MODELS, TARGETS

if TYPE_CHECKING:
    from export.onnx_export import export_model


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from export.onnx_export import export_model

        return export_model
    raise AttributeError(f"module 'export' has no attribute {name!r}")


__all__ = ["MODELS", "TARGETS", "export_model"]
