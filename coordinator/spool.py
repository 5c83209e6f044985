"""A round's accepted updates on disk, so that the coordinator's memory does not grow with the
number of devices: each update is one float32 row (parameters in the manifest's order) of an
unnamed temporary file, read back one update at a time (``updates``: FedAvg's mean in one
pass), a chunk of rows at a time (``row_chunks``: the anomaly scores) or a block of columns of
some rows at a time (``column_blocks``: the median update). The rows live in the
page cache, which the kernel writes out and evicts under pressure."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from coordinator.robust import Weighted
from edge.wire import Params


class UpdateSpool:
    """Rows of float32 parameters keyed by device, for one round at a time (``clear``)."""

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], directory: str | Path | None = None
    ) -> None:
        """``shapes``: each parameter's, in the order of a row (the manifest's)."""
        self.names = list(shapes)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.sizes = [int(np.prod(self.shapes[n], dtype=np.int64)) for n in self.names]
        self.width = sum(self.sizes)  # float32 values per row
        self._file = tempfile.TemporaryFile(prefix="edgeleak-spool-", dir=directory)
        self._rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, device: object) -> bool:
        return device in self._rows

    def put(self, device: str, params: Params) -> None:
        """Write ``device``'s parameters (the manifest's names and shapes) as its row."""
        arrays = [np.ascontiguousarray(params[n], np.float32) for n in self.names]
        size = sum(a.nbytes for a in arrays)
        if size != 4 * self.width:
            raise ValueError(f"{device}: {size} bytes of parameters, expected {4 * self.width}")
        row = self._rows.setdefault(device, len(self._rows))
        views = [a.data.cast("B") for a in arrays]
        wrote = os.pwritev(self._file.fileno(), views, row * 4 * self.width)
        if wrote != size:
            raise OSError(f"spool: wrote {wrote} of {size} bytes of {device}'s row")

    def params(self, device: str) -> Params:
        """``device``'s parameters, read back (float32, the manifest's shapes)."""
        flat = np.empty(self.width, np.float32)
        self._read(flat, self._rows[device], 0)
        out: Params = {}
        lo = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[name] = flat[lo : lo + size].reshape(self.shapes[name])
            lo += size
        return out

    def updates(self, devices: Sequence[str], examples: Sequence[int]) -> SpooledUpdates:
        """(params, examples) of ``devices`` in that order, each read when it is asked for."""
        return SpooledUpdates(self, list(devices), list(examples))

    def rows(self, devices: Sequence[str]) -> np.ndarray:
        """``devices``' rows as one len(devices) × width float32 matrix."""
        return next(self.column_blocks(devices, self.width))

    def row_chunks(self, devices: Sequence[str], size: int = 64) -> Iterator[np.ndarray]:
        """``devices``' rows, ``size`` at a time (the last chunk may be shorter). The float64
        copy the scores make of a chunk stays below glibc's mmap threshold (64 MiB with
        ``keep_message_buffers``): that of 256 LeNet rows, 126 MB, was mapped and faulted in
        afresh for every chunk."""
        for lo in range(0, len(devices), size):
            yield self.rows(devices[lo : lo + size])

    def column_blocks(self, devices: Sequence[str], width: int = 4096) -> Iterator[np.ndarray]:
        """``devices``' rows, ``width`` columns at a time, left to right: len(devices) × width
        float32 blocks (the last may be narrower), so that a large sample is never whole in
        memory."""
        for lo in range(0, self.width, width):
            out = np.empty((len(devices), min(width, self.width - lo)), np.float32)
            for i, d in enumerate(devices):
                self._read(out[i], self._rows[d], lo)
            yield out

    def clear(self) -> None:
        """Forget every row (a new round). The file keeps its size: the next round's rows
        overwrite these in place, in page-cache pages already there (freeing them and faulting
        new ones in made every put twice as slow here)."""
        self._rows.clear()

    def file_bytes(self) -> int:
        """Size of the spool's file: the largest round's rows so far."""
        return os.fstat(self._file.fileno()).st_size

    def close(self) -> None:
        self._file.close()

    def _read(self, out: np.ndarray, row: int, column: int) -> None:
        want = out.nbytes
        got = os.preadv(self._file.fileno(), [out.data.cast("B")],
                        (row * self.width + column) * 4)  # fmt: skip
        if got != want:
            raise OSError(f"spool: read {got} of {want} bytes of row {row}")


class SpooledUpdates(Sequence[Weighted]):
    """(params, examples) of spooled updates in a fixed order; each item is read from disk
    when it is asked for and not kept."""

    def __init__(self, spool: UpdateSpool, devices: list[str], examples: list[int]) -> None:
        if len(devices) != len(examples):
            raise ValueError("one example count per device")
        self.spool = spool
        self.devices = devices
        self.examples = examples

    def __len__(self) -> int:
        return len(self.devices)

    @overload
    def __getitem__(self, i: int) -> Weighted: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Weighted]: ...
    def __getitem__(self, i: int | slice) -> Weighted | Sequence[Weighted]:
        if isinstance(i, slice):
            return SpooledUpdates(self.spool, self.devices[i], self.examples[i])
        return self.spool.params(self.devices[i]), self.examples[i]
