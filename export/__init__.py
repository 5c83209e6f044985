"""Model zoo and exporters: torch models to device artifacts plus a manifest."""

from export.onnx_export import TARGETS, export_model

__all__ = ["TARGETS", "export_model"]
