"""The model manifest: the layout of an update that device, coordinator and attacker share."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ParamSpec:
    """One trainable parameter: its name, shape and dtype (always float32 on the wire)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """What an exported model looks like from the outside.

    ``artifacts`` maps an artifact kind to a file name relative to the manifest's folder:
    ``onnx_grad`` (gradient graph: inputs ``*param names, x, y``; outputs ``loss, logits,
    grad.<param name>...``), ``onnx_infer`` (inputs ``*param names, x``; output ``logits``),
    ``init`` (initial parameters, safetensors), optionally ``pte`` and ``pt2``.
    ``sha256`` is the content hash of the layout and every artifact file.
    ``flops_per_example``: FLOPs to train on one example, counted from the inference graph at
    export (``export.flops``; 0 when not counted). It is derived from the artifacts, so it is
    not hashed.
    """

    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    params: tuple[ParamSpec, ...]
    artifacts: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    version: int = MANIFEST_VERSION
    flops_per_example: int = 0

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def num_parameters(self) -> int:
        return sum(p.size for p in self.params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: p.shape for p in self.params}

    def layout_json(self) -> str:
        """Canonical JSON of the layout (everything but artifacts and hash)."""
        return json.dumps(
            {
                "version": self.version,
                "model": self.model,
                "input_shape": list(self.input_shape),
                "num_classes": self.num_classes,
                "params": [[p.name, list(p.shape), p.dtype] for p in self.params],
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "model": self.model,
                "input_shape": list(self.input_shape),
                "num_classes": self.num_classes,
                "params": [
                    {"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in self.params
                ],
                "artifacts": self.artifacts,
                "sha256": self.sha256,
                "flops_per_example": self.flops_per_example,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"manifest: expected a JSON object, got {type(d).__name__}")
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(
                f"manifest version {d.get('version')!r} is not supported; expected {MANIFEST_VERSION}"
            )
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"manifest: missing or malformed field ({e!r})") from None

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            model=str(d["model"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            params=tuple(
                ParamSpec(str(p["name"]), tuple(int(s) for s in p["shape"]), str(p["dtype"]))
                for p in d["params"]
            ),
            artifacts={str(k): str(v) for k, v in d.get("artifacts", {}).items()},
            sha256=str(d.get("sha256", "")),
            flops_per_example=int(d.get("flops_per_example", 0)),
        )


def content_hash(manifest: Manifest, folder: Path) -> str:
    """SHA-256 over the canonical layout and the bytes of every artifact, in kind order."""
    h = hashlib.sha256(manifest.layout_json().encode())
    for kind in sorted(manifest.artifacts):
        h.update(kind.encode())
        h.update((folder / manifest.artifacts[kind]).read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelArtifact:
    """A manifest together with the folder its artifacts live in."""

    manifest: Manifest
    folder: Path

    def path(self, kind: str) -> Path:
        if kind not in self.manifest.artifacts:
            have = ", ".join(sorted(self.manifest.artifacts)) or "none"
            raise FileNotFoundError(
                f"model {self.manifest.model!r} has no {kind!r} artifact (it has: {have}); "
                f"re-export it with that target"
            )
        return self.folder / self.manifest.artifacts[kind]

    @classmethod
    def load(cls, folder: str | Path, *, verify: bool = True) -> ModelArtifact:
        """Read ``manifest.json`` from ``folder``; check the content hash when ``verify``."""
        folder = Path(folder)
        mpath = folder / MANIFEST_FILE
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{mpath} does not exist: expected a model folder written by `edgeleak export`"
            )
        manifest = Manifest.from_json(mpath.read_text())
        if verify:
            actual = content_hash(manifest, folder)
            if actual != manifest.sha256:
                raise ValueError(
                    f"{folder}: content hash {actual[:12]} does not match the manifest's "
                    f"{manifest.sha256[:12]}; the artifacts were changed after export"
                )
        return cls(manifest, folder)

    def initial_params(self) -> dict[str, np.ndarray]:
        """The exported initial parameters, in manifest order."""
        from edge.codec import read_tensors

        tensors = read_tensors(self.path("init").read_bytes())
        return {name: tensors[name] for name in self.manifest.param_names}
