"""Whole Zarr v3 shard files of uncompressed chunks, written directly in zarr's sharding format.

At real shapes (one 2 MiB step per inner chunk, 32 per shard) zarr's codec pipeline wrote 23-45 MiB/s
where a plain write of the same bytes reached 340-970 MiB/s on the same disk (`make bench`, area store):
it scans every chunk for the fill value, copies each chunk through its buffers and builds the shard in
memory. An uncompressed shard is just the chunks back to back (each optionally followed by its CRC32C),
then the index (offset, length) per chunk as little-endian uint64 and the index's CRC32C, so it is written
here from the array itself, and read back the same way (`ShardReader`): through zarr a loader reached
0.006-0.02 of a plain read of the same bytes (`make bench`, train loader row), held back by zarr's
per-chunk machinery, not by the bytes. zarr reads these files too (the tests compare both paths byte
for byte); compressed codecs go through zarr both ways.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, Endian, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

__all__ = ["DamagedShard", "ShardReader", "direct_layout", "write_shard_file"]

MISSING = np.uint64(2**64 - 1)  # index entry of a chunk not in the shard
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers per preadv call


def direct_layout(array) -> bool | None:
    """For a zarr array that this module can write and read: whether its chunks carry a CRC32C; None otherwise
    (compressed, big-endian, another index layout, or chunks that are not one step of the whole remaining shape)."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner = [type(codec) for codec in sharding.codecs]
    index = [type(codec) for codec in sharding.index_codecs]
    if (
        inner not in ([BytesCodec], [BytesCodec, Crc32cCodec])
        or index != [BytesCodec, Crc32cCodec]
        or sharding.index_location != ShardingCodecIndexLocation.end
        or tuple(sharding.chunk_shape) != (1, *array.shape[1:])
        or sharding.codecs[0].endian not in (Endian.little, None)
    ):
        return None
    return inner[-1] is Crc32cCodec


def write_shard_file(path: Path, stored: np.ndarray, chunks_per_shard: int, checksum: bool) -> tuple[int, int]:
    """Atomically replace the shard file `path` with the rows `stored` [rows <= chunks_per_shard, ...]
    (one inner chunk per row; rows past the end of the array are left out, as zarr does). Returns the file's
    (size, CRC32C), computed over the bytes as they are written (no read-back)."""
    stored = np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<"))
    rows, chunk_bytes = len(stored), stored[0].nbytes if len(stored) else 0
    step = chunk_bytes + (4 if checksum else 0)
    index = np.full((chunks_per_shard, 2), MISSING, dtype="<u8")
    index[:rows, 0] = np.arange(rows, dtype=np.uint64) * np.uint64(step)
    index[:rows, 1] = step
    index_bytes = index.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")  # what a killed writer leaves; removed on resume
    size, crc = 0, 0

    def write(f, data) -> None:
        nonlocal size, crc
        f.write(data)
        view = np.frombuffer(data, dtype=np.uint8)
        view.flags.writeable = False  # what google_crc32c.extend takes (no copy)
        size, crc = size + view.nbytes, google_crc32c.extend(crc, view)

    try:
        with open(partial, "wb") as f:
            if checksum:
                for row in stored:
                    data = row.reshape(-1).view(np.uint8)
                    write(f, data)
                    write(f, np.uint32(google_crc32c.value(data)).astype("<u4").tobytes())
            else:
                write(f, memoryview(stored).cast("B"))
            write(f, index_bytes)
            write(f, np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes())
        os.replace(partial, path)
        return size, crc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class DamagedShard(Exception):
    """A shard file whose bytes contradict its format (index or chunk CRC32C, offsets, lengths, size)."""


class ShardReader:
    """Reads rows of one array straight from its uncompressed shard files into a preallocated buffer.

    Each shard's index is read once, checked by its CRC32C and kept until the file changes (shards are
    replaced by rename, so a rewritten, repaired or newly written shard has another inode, size or time).
    No file stays open: a reader copied into a forked DataLoader worker shares no descriptor.
    """

    def __init__(self, chunks_per_shard: int, row_shape: tuple[int, ...], dtype: np.dtype, checksum: bool, fill_value):
        self.chunks_per_shard, self.row_shape, self.checksum = chunks_per_shard, row_shape, checksum
        self.dtype, self.fill_value = np.dtype(dtype).newbyteorder("<"), fill_value
        self.step = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize + (4 if checksum else 0)
        self._indexes: dict[Path, tuple[tuple, np.ndarray]] = {}

    def read(self, path: Path, chunks: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
        """out[positions[i]] = chunk chunks[i] of shard file `path` (chunks ascending and unique; a chunk the
        index lists as missing gets the fill value, as zarr gives it). FileNotFoundError if there is no
        file; DamagedShard (or OSError) if it cannot be read as written."""
        raw = out.reshape(len(out), -1).view(np.uint8)
        descriptor = os.open(path, os.O_RDONLY)
        try:
            data_end, entries = self._index(path, descriptor)
            entries = entries[chunks]
            missing = entries[:, 0] == MISSING
            present, kept = entries[~missing], positions[~missing]
            limit = data_end - self.step
            if len(present) and (limit < 0 or ((present[:, 1] != self.step) | (present[:, 0] > limit)).any()):
                raise DamagedShard(
                    f"its index places a chunk outside the chunk data or gives it another length than {self.step} bytes"
                )
            out[positions[missing]] = self.fill_value
            offsets = present[:, 0].astype(np.int64)
            crcs = np.empty((len(kept), 4), np.uint8) if self.checksum else None
            breaks = (np.flatnonzero(np.diff(offsets) != self.step) + 1).tolist()  # runs of chunks back to back
            for start, stop in zip([0, *breaks], [*breaks, len(kept)]) if len(kept) else ():
                self._read_run(
                    descriptor, int(offsets[start]), raw, kept[start:stop], None if crcs is None else crcs[start:stop]
                )
        finally:
            os.close(descriptor)
        if crcs is not None:
            for position, crc, chunk in zip(
                kept.tolist(), crcs.view("<u4").reshape(-1).tolist(), chunks[~missing].tolist()
            ):
                if google_crc32c.value(raw[position]) != crc:
                    raise DamagedShard(f"chunk {chunk} does not match its CRC32C")

    @staticmethod
    def _read_run(
        descriptor: int, offset: int, raw: np.ndarray, positions: np.ndarray, crcs: np.ndarray | None
    ) -> None:
        """preadv of chunks back to back in the file: each into its row of `raw`, its CRC32C into `crcs`."""
        buffers = (
            [raw[p] for p in positions.tolist()]
            if crcs is None
            else [buffer for p, crc in zip(positions.tolist(), crcs) for buffer in (raw[p], crc)]
        )
        for first in range(0, len(buffers), _IOV_MAX):
            part = buffers[first : first + _IOV_MAX]
            wanted = sum(buffer.nbytes for buffer in part)
            if os.preadv(descriptor, part, offset) != wanted:
                raise DamagedShard("the file ends inside its chunk data")
            offset += wanted

    def _index(self, path: Path, descriptor: int) -> tuple[int, np.ndarray]:
        """(end of the chunk data, index [chunks, 2] of (offset, nbytes)) of the open shard file `path`;
        read and checked again whenever the file is another one than last time."""
        stat = os.fstat(descriptor)
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        length = self.chunks_per_shard * 16 + 4
        cached = self._indexes.get(path)
        if cached is None or cached[0] != signature:
            if stat.st_size < length:
                raise DamagedShard(f"{stat.st_size} bytes, shorter than its index ({length} bytes)")
            data = os.pread(descriptor, length, stat.st_size - length)
            if len(data) != length:
                raise DamagedShard("the file ends inside its index")
            if google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
                raise DamagedShard("its index does not match its CRC32C")
            cached = self._indexes[path] = (signature, np.frombuffer(data[:-4], dtype="<u8").reshape(-1, 2))
        return stat.st_size - length, cached[1]
