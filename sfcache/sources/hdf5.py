"""HDF5 helpers shared by the LIBERO and RoboTwin readers: checked dataset access, a per-process handle cache."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from sfcache.errors import SourceError

# Dataset kinds a reader may ask for: numpy dtype kinds accepted and how the expectation is worded.
KINDS = {"float": ("f", "float array"), "uint8": ("u", "uint8 array"), "bytes": ("SOV", "encoded image bytes")}


def open_h5(file: Path) -> h5py.File:
    """Open read-only; a truncated or non-HDF5 file becomes a SourceError naming it."""
    try:
        return h5py.File(file, "r")
    except OSError as err:
        raise SourceError(file, f"cannot open as HDF5 (truncated or not HDF5: {err})") from None


def scan_files(
    files: list[Path], where: Path, expected: str, scan_file: Callable[[Path, h5py.File], Iterable]
) -> Iterator:
    """Each file's episodes from `scan_file(file, h5)`; a file that fails to open or check yields its
    SourceError instead, so skip_bad can leave that file out and go on."""
    if not files:
        yield SourceError(where, f"no {expected}")
    for file in files:
        try:
            with open_h5(file) as h5:
                yield from scan_file(file, h5)
        except SourceError as err:
            yield err


def checked(group: h5py.Group, name: str, file: Path, episode: str, *, kind: str, shape: tuple) -> h5py.Dataset:
    """Dataset `name` of `group`, its dtype kind and shape checked; None in `shape` matches any size.

    The error names the expectation, e.g. "shape (12, 6), expected float array [T=12, 7]".
    """
    kinds, words = KINDS[kind]
    wanted = "[" + ", ".join("any" if size is None else str(size) for size in shape) + "]"
    dataset = group.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise SourceError(file, f"missing (expected {words} {wanted})", episode=episode, key=_path(group, name))
    if dataset.dtype.kind not in kinds or (kind == "uint8" and dataset.dtype != np.uint8):
        raise SourceError(
            file, f"dtype {dataset.dtype}, expected {words} {wanted}", episode=episode, key=_path(group, name)
        )
    if len(dataset.shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(dataset.shape, shape)
    ):
        raise SourceError(
            file, f"shape {dataset.shape}, expected {words} {wanted}", episode=episode, key=_path(group, name)
        )
    return dataset


def _path(group: h5py.Group, name: str) -> str:
    return f"{group.name.strip('/')}/{name}".lstrip("/")


def require_steps(file: Path, episode: str, lengths: dict[str, int]) -> int:
    """All per-step datasets must have one length T > 0; returns T."""
    distinct = set(lengths.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{key} {length}" for key, length in lengths.items())
        raise SourceError(
            file, f"per-step datasets disagree on the number of steps ({listed}); expected one length", episode=episode
        )
    steps = distinct.pop()
    if steps == 0:
        raise SourceError(file, "empty episode (0 steps)", episode=episode, key=next(iter(lengths)))
    return steps


def read_range(dataset: h5py.Dataset, start: int, stop: int, file: Path, episode: str) -> np.ndarray:
    """Rows [start, stop); an unreadable chunk (truncated file) becomes a SourceError."""
    try:
        return dataset[start:stop]
    except (OSError, ValueError) as err:
        raise SourceError(
            file, f"cannot read steps [{start}, {stop}): {err}", episode=episode, key=dataset.name.lstrip("/")
        ) from None


class HandleCache:
    """Keep the last few HDF5 files open in this process (RoboTwin has one file per episode) and the
    datasets looked up in them: an h5py path lookup costs about as much as reading a step's vectors."""

    def __init__(self, size: int = 8):
        self.size = size
        self.open: OrderedDict[Path, tuple[h5py.File, dict[str, h5py.Dataset]]] = OrderedDict()

    def dataset(self, file: Path, name: str) -> h5py.Dataset:
        """Dataset `name` (a path inside `file`), structure already checked by the reader's scan."""
        if file in self.open:
            self.open.move_to_end(file)
        else:
            self.open[file] = (open_h5(file), {})
            if len(self.open) > self.size:
                self.open.popitem(last=False)[1][0].close()
        h5, datasets = self.open[file]
        if name not in datasets:
            datasets[name] = h5[name]
        return datasets[name]
