"""Direct reads of uncompressed shard files (`sfcache.shard_file.ShardReader`) against zarr's read path:
byte-identical values for every stored array and request shape, damage named in one StoreError, and
shards rewritten after a Cache was opened read as they are now."""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest

from sfcache.errors import StoreError
from sfcache.shard_file import MISSING
from sfcache.sources.base import EpisodeInfo
from sfcache.store import create_store, layer_array, lock_store, open_cache, pack_episodes
from tests.test_reduce import low_rank, write_reduced
from tests.test_store import LAYER, build, make_config, targets_for

VALUES = layer_array(LAYER)
# 15 steps in shards of 4: the last shard holds 3 rows
REQUESTS = {
    "all": slice(None),
    "one": [5],
    "sorted run": [4, 5, 6, 7, 8],
    "unsorted": [9, 2, 14, 0, 7],
    "repeats": [3, 3, 11, 3, 11, 0, 0],
    "last partial shard": [12, 13, 14],
    "across shards": [2, 3, 4, 5, 6],
    "empty": np.zeros(0, np.int64),
    "reversed": list(range(14, -1, -1)),
}


def through_zarr(cache):
    """The same store, every read through zarr."""
    zarr_cache = open_cache(cache.path)
    zarr_cache.direct_reads = False
    return zarr_cache


def assert_identical(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert ours.tobytes() == theirs.tobytes()


def shard_path(cache, shard: int, name: str = VALUES):
    return cache.shard_file(name, shard)


@pytest.mark.parametrize("request_name", list(REQUESTS))
@pytest.mark.parametrize(
    "dtype,checksum,mask",
    [
        ("float16", False, False),
        ("float16", True, True),
        ("bfloat16", False, True),
        ("bfloat16", True, False),
        ("int8", False, True),
        ("int8", True, False),
    ],
)
def test_direct_reads_equal_zarrs_byte_for_byte(tmp_path, dtype, checksum, mask, request_name):
    config = make_config(dtype=dtype, checksum=checksum, token_mask=mask)
    values = targets_for(config)
    tokens = np.random.default_rng(1).random(values.shape[:3]) < 0.7
    with lock_store(tmp_path / "s"):
        cache = create_store(tmp_path / "s", config)
        for shard in range(cache.num_shards):
            rows = cache.shard_rows(shard)
            cache.write_shard(shard, {LAYER: values[rows]}, tokens[rows] if mask else None)
    cache, zarr_cache = open_cache(tmp_path / "s"), through_zarr(open_cache(tmp_path / "s"))
    rows = REQUESTS[request_name]
    for name in cache._target_arrays():  # values, int8 scales, the mask: each as stored
        assert cache._reader(name) is not None and zarr_cache._reader(name) is not None
        asked = np.arange(cache.num_steps)[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        assert_identical(cache._read(name, asked), zarr_cache._read(name, asked))
    ours, theirs = cache.read_rows(rows, mask=True), zarr_cache.read_rows(rows, mask=True)
    for mine, zarrs in zip(ours, theirs):
        assert_identical(mine, zarrs)
    if dtype == "float16":
        assert_identical(cache.read_rows(rows, decoded=False), zarr_cache.read_rows(rows, decoded=False))


def test_reduced_store_coefficients_and_targets_equal_zarrs(tmp_path):
    cache = write_reduced(tmp_path / "r", low_rank(20, 3, 16, 0.01), "pca:4")
    assert cache._reader(layer_array(0)) is not None
    zarr_cache = through_zarr(cache)
    for rows in ([19, 3, 3, 8, 0], slice(None)):
        assert_identical(cache.read_rows(rows, reconstruct=False), zarr_cache.read_rows(rows, reconstruct=False))
        assert_identical(cache.read_rows(rows), zarr_cache.read_rows(rows))


def test_compressed_stores_keep_zarrs_path(tmp_path):
    config, values = build(tmp_path / "s", codec="zstd")
    cache = open_cache(tmp_path / "s")
    assert cache._reader(VALUES) is None
    assert_identical(cache.read_rows([7, 1, 1]), through_zarr(cache).read_rows([7, 1, 1]))


def test_a_chunk_missing_from_the_index_reads_as_zarrs_fill_value(tmp_path):
    """zarr leaves an all-zero chunk out of the shard (index entry MISSING) and reads it as 0; so do direct reads."""
    config = make_config()
    values = targets_for(config)
    values[5] = 0
    with lock_store(tmp_path / "s"):
        writer = create_store(tmp_path / "s", config)
        writer._array(VALUES)[:] = values.astype(np.float16)  # zarr's own writer
        for shard in range(writer.num_shards):
            writer._array("done")[shard] = 1
    cache = open_cache(tmp_path / "s")
    data = shard_path(cache, 1).read_bytes()
    assert np.frombuffer(data[-4 * 16 - 4 : -4], "<u8").reshape(-1, 2)[1, 0] == MISSING
    for rows in ([5], [4, 5, 6], [5, 0, 5]):
        assert_identical(cache.read_rows(rows), through_zarr(cache).read_rows(rows))
    assert not cache.read_rows([5]).any()


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("damage", ["chunk byte", "index", "truncated", "index offset"])
def test_damaged_shards_raise_one_line_naming_the_file(tmp_path, checksum, damage):
    build(tmp_path / "s", checksum=checksum)
    cache = open_cache(tmp_path / "s")
    file = shard_path(cache, 1)
    data = bytearray(file.read_bytes())
    index = 4 * 16 + 4
    if damage == "chunk byte":
        data[100] ^= 0x01
    elif damage == "index":
        data[-40:] = bytes(range(40))
    elif damage == "index offset":  # a consistent index (its CRC32C redone) pointing past the chunk data
        import google_crc32c

        entries = np.frombuffer(bytes(data[-index:-4]), "<u8").reshape(-1, 2).copy()
        entries[2, 0] = len(data)
        data[-index:] = entries.tobytes() + np.uint32(google_crc32c.value(entries.tobytes())).astype("<u4").tobytes()
    else:
        data = data[: len(data) // 2]
    file.write_bytes(bytes(data))
    if damage == "chunk byte" and not checksum:  # what --checksum is for: the flip reads as an ordinary number
        assert_identical(cache.read_rows([4, 5, 6]), through_zarr(cache).read_rows([4, 5, 6]))
        return
    with pytest.raises(StoreError) as error:
        cache.read_rows([0, 4, 6])
    message = str(error.value)  # the one damaged file, not every file the request touched
    assert message.startswith(f"{file}: reading {VALUES} shard(s) [1] failed") and "\n" not in message
    repair = "run `sf extract` again with the same options and ExtractConfig.repair"
    assert message.endswith(f"the file is damaged: {repair}")
    if damage != "index offset":  # zarr reads a chunk past the data without complaint
        with pytest.raises(StoreError) as error:
            through_zarr(cache).read_rows([0, 4, 6])
        assert str(file) in str(error.value) and str(error.value).endswith(message[message.index("; the file") :])
    assert_identical(cache.read_rows([0, 1, 8]), through_zarr(cache).read_rows([0, 1, 8]))  # other shards read


def test_shards_written_or_rewritten_after_the_cache_opened_read_as_they_are_now(tmp_path):
    """A reader opened on a half-written store (an extraction being resumed), then a shard rewritten by
    --repair with other values (other index too: zarr left a chunk out) after the reader had read it."""
    config = make_config(checksum=True)
    first, second = targets_for(config, seed=0), targets_for(config, seed=1)
    second[6] = 0
    with lock_store(tmp_path / "s"):
        writer = create_store(tmp_path / "s", config)
        writer.write_shard(0, {LAYER: first[writer.shard_rows(0)]})
        reader = open_cache(tmp_path / "s")
        assert_identical(reader.read_rows([1, 0]), through_zarr(reader).read_rows([1, 0]))
        with pytest.raises(StoreError, match="not extracted yet"):
            reader.read_rows([5])
        for shard in range(1, writer.num_shards):
            writer.write_shard(shard, {LAYER: first[writer.shard_rows(shard)]})
        before = reader.read_rows([5, 6])
        assert np.array_equal(before, first[[5, 6]].astype(np.float16).astype(np.float32))
        writer.mark_not_done([1])  # --repair: not done, file deleted
        with pytest.raises(StoreError, match="missing"):
            reader.read_rows([5])
        writer._array(VALUES)[writer.shard_rows(1)] = second[writer.shard_rows(1)].astype(np.float16)
        writer._array("done")[1] = 1
    after = reader.read_rows([4, 5, 6, 7])
    assert_identical(after, through_zarr(reader).read_rows([4, 5, 6, 7]))
    assert np.array_equal(after, second[4:8].astype(np.float16).astype(np.float32))


def _read_in_child(cache, rows, results):
    results.put(cache.read_rows(rows).tobytes())


def test_direct_reads_work_in_forked_and_unpickled_copies(tmp_path):
    build(tmp_path / "s", checksum=True)
    cache = open_cache(tmp_path / "s")
    rows = [14, 2, 9]
    expected = cache.read_rows(rows)  # indexes read (and kept) before the fork
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_read_in_child, args=(cache, rows, results))
    child.start()
    assert results.get(timeout=60) == expected.tobytes()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert_identical(pickle.loads(pickle.dumps(cache)).read_rows(rows), expected)


def test_a_target_longer_than_one_preadv_call_reads_whole(tmp_path, monkeypatch):
    """Runs of more chunks than one preadv takes are split over calls."""
    import sfcache.shard_file as shard_file

    monkeypatch.setattr(shard_file, "_IOV_MAX", 3)
    episodes = pack_episodes([EpisodeInfo("e", "", 20)])
    path = tmp_path / "s"
    _, values = build(path, episodes=episodes, steps_per_shard=16, checksum=True)
    cache = open_cache(path)
    assert_identical(cache.read_rows(slice(None)), through_zarr(cache).read_rows(slice(None)))
    assert np.array_equal(cache.read_rows(slice(None)), values.astype(np.float16).astype(np.float32))
