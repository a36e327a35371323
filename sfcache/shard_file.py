"""Whole Zarr v3 shard files of uncompressed chunks, written directly in zarr's sharding format.

At real shapes (one 2 MiB step per inner chunk, 32 per shard) zarr's codec pipeline wrote 23-45 MiB/s
where a plain write of the same bytes reached 340-970 MiB/s on the same disk (`make bench`, area store):
it scans every chunk for the fill value, copies each chunk through its buffers and builds the shard in
memory. An uncompressed shard is just the chunks back to back (each optionally followed by its CRC32C),
then the index (offset, length) per chunk as little-endian uint64 and the index's CRC32C, so it is written
here from the array itself. zarr reads these files (the store's tests read every store through zarr);
compressed codecs still go through zarr.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

__all__ = ["direct_layout", "write_shard_file"]

MISSING = np.uint64(2**64 - 1)     # index entry of a chunk not in the shard


def direct_layout(array) -> bool | None:
    """For a zarr array that this module can write: whether its chunks carry a CRC32C; None otherwise
    (compressed, another index layout, or chunks that are not one step of the whole remaining shape)."""
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner = [type(codec) for codec in sharding.codecs]
    index = [type(codec) for codec in sharding.index_codecs]
    if (inner not in ([BytesCodec], [BytesCodec, Crc32cCodec]) or index != [BytesCodec, Crc32cCodec]
            or sharding.index_location != ShardingCodecIndexLocation.end
            or tuple(sharding.chunk_shape) != (1, *array.shape[1:])):
        return None
    return inner[-1] is Crc32cCodec


def write_shard_file(path: Path, stored: np.ndarray, chunks_per_shard: int, checksum: bool) -> None:
    """Atomically replace the shard file `path` with the rows `stored` [rows <= chunks_per_shard, ...]
    (one inner chunk per row; rows past the end of the array are left out, as zarr does)."""
    stored = np.ascontiguousarray(stored, dtype=stored.dtype.newbyteorder("<"))
    rows, chunk_bytes = len(stored), stored[0].nbytes if len(stored) else 0
    step = chunk_bytes + (4 if checksum else 0)
    index = np.full((chunks_per_shard, 2), MISSING, dtype="<u8")
    index[:rows, 0] = np.arange(rows, dtype=np.uint64) * np.uint64(step)
    index[:rows, 1] = step
    index_bytes = index.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")   # what a killed writer leaves; removed on resume
    try:
        with open(partial, "wb") as f:
            if checksum:
                for row in stored:
                    data = row.reshape(-1).view(np.uint8)
                    f.write(data)
                    f.write(np.uint32(google_crc32c.value(data)).astype("<u4").tobytes())
            else:
                f.write(memoryview(stored).cast("B"))
            f.write(index_bytes)
            f.write(np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
