"""A content-addressed cache of exported models: demos, sweep points and benchmarks export each
model once per machine instead of once per run (symbolic tracing takes 10 s for LeNet, minutes
for the ResNet).

An entry is keyed by everything the export depends on: the model name, input shape, classes,
seed, targets, vocabulary, the versions of torch, onnx, onnxscript and executorch, and the source
of the exporter and the zoo (``export/*.py``) and of the manifest format. It is written to a
temporary folder and renamed into place, so concurrent runs never see half an entry, and it is
copied out and verified against its manifest's content hash on every use; an entry that fails
the check is exported again.

``EDGELEAK_EXPORT_CACHE``: the cache folder (default ``~/.cache/edgeleak/exports``, or under
``$XDG_CACHE_HOME``); ``off`` exports every time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from edge.manifest import ModelArtifact

CACHE_ENV = "EDGELEAK_EXPORT_CACHE"
_PACKAGES = ("torch", "onnx", "onnxscript", "executorch")
_SOURCES = (
    *sorted(Path(__file__).parent.glob("*.py")),
    Path(__file__).parents[1] / "edge" / "manifest.py",
)


def cache_dir() -> Path | None:
    """The cache folder, or None when ``EDGELEAK_EXPORT_CACHE=off``."""
    value = os.environ.get(CACHE_ENV, "")
    if value == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeleak" / "exports"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def export_key(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int,
    targets: Sequence[str],
    vocab: Sequence[str],
) -> str:
    """The cache key of one export (hex)."""
    h = hashlib.sha256()
    what = {
        "name": name, "input_shape": list(input_shape),
        "num_classes": num_classes, "seed": seed, "targets": sorted(targets),
        "vocab": hashlib.sha256("\n".join(vocab).encode()).hexdigest() if vocab else "",
        "versions": {p: _version(p) for p in _PACKAGES},
    }  # fmt: skip
    h.update(json.dumps(what, sort_keys=True).encode())
    for path in _SOURCES:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:32]


def cached_export(
    name: str,
    out_dir: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
    seed: int = 0,
    targets: Sequence[str] = ("onnx",),
    vocab: Sequence[str] = (),
) -> ModelArtifact:
    """``export.export_model`` with the same arguments, through the cache: ``out_dir`` gets a
    copy of the cached entry (exported first if missing or corrupt) and is verified."""
    from export import zoo
    from export.onnx_export import export_model

    shape = tuple(input_shape) if input_shape else zoo.default_input_shape(name)
    export = functools.partial(
        export_model, name, input_shape=shape, num_classes=num_classes, seed=seed,
        targets=targets, vocab=vocab,
    )  # fmt: skip
    folder = cache_dir()
    if folder is None:
        return export(out_dir)
    entry = folder / export_key(name, shape, num_classes, seed, targets, vocab)
    if entry.is_dir():
        try:
            return _copy(entry, Path(out_dir))
        except (OSError, ValueError):  # a corrupt entry: export it again
            shutil.rmtree(entry, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{entry.name}.{uuid.uuid4().hex[:8]}"
    export(tmp)
    try:
        tmp.rename(entry)
    except OSError:  # another run put the same entry in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return _copy(entry, Path(out_dir))


def _copy(entry: Path, out: Path) -> ModelArtifact:
    """``entry``'s files into ``out``, loaded and checked against the manifest's content hash."""
    shutil.copytree(entry, out, dirs_exist_ok=True)
    return ModelArtifact.load(out)
