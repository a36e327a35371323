"""The Zarr target store: encodings, layout, resume/mismatch rules, lock, read API, read-only safety."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from sfcache.errors import ConfigMismatch, StoreError
from sfcache.inspection import token_cosine
from sfcache.sources.base import EpisodeInfo
from sfcache.store import (
    Cache,
    StoreConfig,
    create_store,
    decode,
    encode,
    int8_block,
    lock_store,
    open_cache,
    pack_episodes,
)

EPISODES = pack_episodes(
    [
        EpisodeInfo("suite/a/demo_0", "pick the bowl", 5),
        EpisodeInfo("suite/a/demo_1", "place the bowl", 7),
        EpisodeInfo("suite/b/demo_0", "open the drawer", 3),
    ]
)
LAYER = 3


def make_config(**changes) -> StoreConfig:
    fields = dict(
        episodes=EPISODES,
        layers=(LAYER,),
        grid=(2, 3),
        native_grid=(4, 4),
        aspect_ratio=1.0,
        views=("primary", "wrist"),
        channels=8,
        vggt={
            "weights": "random:tiny",
            "weights_id": "random:tiny+seed0",
            "config": {"depth": 4},
            "preprocess": "sf",
            "compute_dtype": "float32",
        },
        source={"format": "libero_hdf5", "path": "/data/libero", "fingerprint": "abc", "rotate": True},
        steps_per_shard=4,
    )
    fields.update(changes)
    return StoreConfig(**fields)


def targets_for(config: StoreConfig, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (config.num_steps, len(config.views), config.grid[0] * config.grid[1], config.channels)
    return (rng.standard_normal(shape) * rng.uniform(0.1, 10, size=(1, 1, 1, config.channels))).astype(np.float32)


def write_all(cache: Cache, values: np.ndarray, shards=None) -> None:
    for shard in range(cache.num_shards) if shards is None else shards:
        cache.write_shard(shard, {LAYER: values[cache.shard_rows(shard)]})


def build(path, **changes) -> tuple[StoreConfig, np.ndarray]:
    config = make_config(**changes)
    values = targets_for(config)
    with lock_store(path):
        write_all(create_store(path, config), values)
    return config, values


# ----------------------------------------------------------------------------- encodings


def test_float16_and_bfloat16_round_exactly_like_torch():
    x = np.random.default_rng(1).standard_normal((3, 2, 5, 7)).astype(np.float32) * 100
    x[0, 0, 0, :3] = [0.0, -0.0, 1e-40]
    stored, scale = encode(x, "bfloat16")
    assert stored.dtype == np.uint16 and scale is None
    reference = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode(stored, "bfloat16"), reference)
    half, _ = encode(x, "float16")
    np.testing.assert_array_equal(decode(half, "float16"), x.astype(np.float16).astype(np.float32))


def test_int8_error_is_within_half_a_step_per_token_and_channel_block():
    x = np.random.default_rng(2).standard_normal((4, 2, 9, 6)).astype(np.float32) * np.arange(1, 7)
    x[1, 0, 3] = 0.0  # an all-zero token must not divide by zero
    stored, scale = encode(x, "int8")
    assert int8_block(6) == 2 and int8_block(2048) == 128
    assert stored.dtype == np.int8 and scale.shape == (4, 2, 9, 3) and scale.dtype == np.float32
    back = decode(stored, "int8", scale)
    assert np.all(np.abs(back - x) <= np.repeat(scale, 2, axis=-1) / 2 + 1e-6)
    assert np.all(back[1, 0, 3] == 0)

    def blocks(a):
        return np.abs(a).reshape(4, 2, 9, 3, 2).max(axis=-1)

    np.testing.assert_allclose(blocks(x), blocks(back), rtol=1e-6)


def test_int8_keeps_other_tokens_exact_next_to_a_50x_outlier_token():
    """Per-channel scales (format 1) let one loud token crush the rest; per-token block scales do not."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 256, 256)).astype(np.float32)
    x[:, :, 7] *= 50
    stored, scale = encode(x, "int8")
    cosine = token_cosine(decode(stored, "int8", scale), x)
    legacy = decode(
        np.clip(np.rint(x / (np.abs(x).max(axis=2) / 127)[:, :, None]), -127, 127).astype(np.int8),
        "int8",
        np.abs(x).max(axis=2) / 127,
    )  # a version-1 store: per-channel scales [T, V, C]
    assert cosine.min() >= 0.9999 and token_cosine(legacy, x).min() < 0.99


# ----------------------------------------------------------------------------- layout and reads


def test_layout_and_provenance_follow_the_architecture(tmp_path):
    config, _ = build(tmp_path / "s", dtype="int8", codec="zstd")
    root = zarr.open_group(str(tmp_path / "s"), mode="r")
    attrs = root.attrs["sfcache"]
    assert (
        attrs["format_version"] == 2
        and attrs["recipe"] == "none"
        and attrs["num_steps"] == 15
        and attrs["num_shards"] == 4
    )
    assert attrs["episodes"] == [
        ["suite/a/demo_0", "pick the bowl", 0, 5],
        ["suite/a/demo_1", "place the bowl", 5, 7],
        ["suite/b/demo_0", "open the drawer", 12, 3],
    ]
    assert attrs["targets"] == {
        "layers": [3],
        "grid": [2, 3],
        "native_grid": [4, 4],
        "aspect_ratio": 1.0,
        "views": ["primary", "wrist"],
        "channels": 8,
        "dtype": "int8",
        "codec": "zstd",
        "checksum": "none",
        "position_embedding": "not baked in",
        "mask": "none",
        "int8_block": 8,
    }
    assert attrs["source"]["fingerprint"] == "abc" and attrs["vggt"]["weights_id"] == "random:tiny+seed0"
    data, scale, done = root["targets/layer_3"], root["targets/layer_3_scale"], root["done"]
    assert data.shape == (15, 2, 6, 8) and data.dtype == np.int8
    assert data.chunks == (1, 2, 6, 8) and data.shards == (4, 2, 6, 8)
    assert data.compressors[0].to_dict()["name"] == "zstd"
    assert scale.shape == (15, 2, 6, 1) and scale.dtype == np.float32
    assert done.shape == (4,) and done.chunks == (1,) and done[:].tolist() == [1, 1, 1, 1]
    assert not (tmp_path / "s" / ".sfcache.lock").exists()


@pytest.mark.parametrize(
    "dtype,codec,tolerance", [("float16", "none", 2e-3), ("bfloat16", "blosc-zstd", 8e-3), ("int8", "zstd", None)]
)
def test_reads_by_key_steps_and_rows(tmp_path, dtype, codec, tolerance):
    config, values = build(tmp_path / "s", dtype=dtype, codec=codec)
    cache = open_cache(tmp_path / "s")
    stored, scale = encode(values, dtype)
    expected = decode(stored, dtype, scale)
    whole = cache.read("suite/a/demo_1")
    assert whole.dtype == np.float32 and whole.shape == (7, 2, 6, 8)
    np.testing.assert_array_equal(whole, expected[5:12])
    np.testing.assert_array_equal(cache.read("suite/a/demo_1", 2), expected[7:8])
    np.testing.assert_array_equal(cache.read("suite/a/demo_1", slice(1, 6, 2)), expected[[6, 8, 10]])
    np.testing.assert_array_equal(cache.read("suite/a/demo_1", [6, 0, -1]), expected[[11, 5, 11]])
    np.testing.assert_array_equal(cache.read_rows([14, 0, 7]), expected[[14, 0, 7]])
    np.testing.assert_array_equal(cache.read_rows(slice(3, 9), layer=-1), expected[3:9])
    if tolerance is not None:
        assert np.abs(whole - values[5:12]).max() <= tolerance * np.abs(values).max()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_shuffled_rows_with_repeats_equal_row_by_row_reads(tmp_path, dtype):
    """The batched read groups rows into runs across shards; values and order must not change."""
    build(tmp_path / "s", dtype=dtype)
    cache = open_cache(tmp_path / "s")
    rows = np.array([9, 3, 4, 14, 3, 5, 0, 13, 12, 9, 8, 1])  # runs 0-1, 3-5, 8-9, 12-14 over 4 shards
    one_by_one = np.concatenate([cache.read_rows([row]) for row in rows])
    batched = cache.read_rows(rows)
    assert batched.shape == (12, 2, 6, 8)
    np.testing.assert_array_equal(batched, one_by_one)
    np.testing.assert_array_equal(cache.read_rows(rows[::-1].astype(np.uint32)), one_by_one[::-1])
    assert not np.array_equal(batched[0], batched[1])  # distinct rows really hold distinct values
    assert cache.read_rows(np.array([], dtype=np.int64)).shape == (0, 2, 6, 8)


def test_read_errors_name_the_key_and_range(tmp_path):
    build(tmp_path / "s")
    cache = open_cache(tmp_path / "s")
    with pytest.raises(StoreError, match="'suite/zzz'"):
        cache.read("suite/zzz")
    with pytest.raises(StoreError, match="suite/b/demo_0.*3 steps; step 3"):
        cache.read("suite/b/demo_0", [3])
    with pytest.raises(StoreError, match="layer 5 is not stored"):
        cache.read("suite/b/demo_0", layer=5)
    with pytest.raises(StoreError, match=r"rows must be integers in \[0, 15\)"):
        cache.read_rows([15])


def test_open_reads_only_the_root_metadata(tmp_path):
    build(tmp_path / "s")
    (tmp_path / "s" / "targets").rename(tmp_path / "elsewhere")
    (tmp_path / "s" / "done").rename(tmp_path / "elsewhere_done")
    cache = open_cache(tmp_path / "s")  # nothing but zarr.json is left
    assert cache.episodes == ["suite/a/demo_0", "suite/a/demo_1", "suite/b/demo_0"]
    assert cache.episode("suite/a/demo_1") == ("suite/a/demo_1", "place the bowl", 5, 7)
    assert (cache.layers, cache.views, cache.grid, cache.channels, cache.dtype) == (
        (3,),
        ("primary", "wrist"),
        (2, 3),
        8,
        "float16",
    )
    with pytest.raises(StoreError, match="missing"):
        cache.read_rows([0])


def test_unfinished_shards_are_reported_and_not_served(tmp_path):
    config = make_config()
    values = targets_for(config)
    with lock_store(tmp_path / "s"):
        write_all(create_store(tmp_path / "s", config), values, shards=[0, 3])
    cache = open_cache(tmp_path / "s")
    assert cache.done_shards().tolist() == [True, False, False, True]
    assert cache.missing_episodes() == ["suite/a/demo_0", "suite/a/demo_1"]  # rows 4..11 live in shards 1, 2
    np.testing.assert_allclose(cache.read("suite/a/demo_0", [0, 3]), values[[0, 3]], rtol=1e-3)
    with pytest.raises(StoreError, match="'suite/a/demo_1' step 2 .row 7. is in shard 1.*not extracted yet"):
        cache.read("suite/a/demo_1", 2)


def test_read_only_cache_cannot_write_and_pickles_lazily(tmp_path):
    _, values = build(tmp_path / "s")
    cache = open_cache(tmp_path / "s")
    before = cache.read_rows([2])
    assert not any(hasattr(cache, name) for name in ("write_shard", "mark_done", "mark_not_done"))  # a writer's
    with pytest.raises(ValueError, match="read-only"):
        cache._array(f"targets/layer_{LAYER}")[0] = 0  # the zarr store itself is read-only
    again = open_cache(tmp_path / "s").read_rows([0, 2])
    np.testing.assert_array_equal(again, np.concatenate([cache.read_rows([0]), before]))
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._arrays == {} and clone._zstore is None
    np.testing.assert_array_equal(clone.read_rows([2]), before)
    with pytest.raises(StoreError, match="read-only"):
        pickle.dumps(open_cache(tmp_path / "s", mode="r+"))


def test_write_failure_leaves_the_shard_not_done(tmp_path, monkeypatch):
    config = make_config()
    values = targets_for(config)
    with lock_store(tmp_path / "s"):
        cache = create_store(tmp_path / "s", config)
        cache.write_shard(0, {LAYER: values[0:4]})

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(zarr.storage.LocalStore, "set", disk_full)
        with pytest.raises(StoreError, match="writing shard 1 .rows 4-7. failed.*No space left"):
            cache.write_shard(1, {LAYER: values[4:8]})
    assert open_cache(tmp_path / "s").done_shards().tolist() == [True, False, False, False]


def test_write_rejects_wrong_shapes(tmp_path):
    with lock_store(tmp_path / "s"):
        cache = create_store(tmp_path / "s", make_config())
        with pytest.raises(StoreError, match=r"shard 3 layer 3 has shape \(4, 2, 6, 8\), expected \(3, 2, 6, 8\)"):
            cache.write_shard(3, {LAYER: np.zeros((4, 2, 6, 8), np.float32)})
        with pytest.raises(StoreError, match="got layers"):
            cache.write_shard(0, {7: np.zeros((4, 2, 6, 8), np.float32)})


# ----------------------------------------------------------------------------- create / resume / overwrite


def test_same_config_resumes_and_keeps_done_shards(tmp_path):
    config = make_config()
    values = targets_for(config)
    with lock_store(tmp_path / "s"):
        write_all(create_store(tmp_path / "s", config), values, shards=[1])
    (tmp_path / "s" / "targets" / "layer_3" / "c" / "x.partial").write_bytes(b"torn")
    later = make_config(created="2030-01-01T00:00:00+00:00", source={**config.source, "path": "/moved"})
    with lock_store(tmp_path / "s"):
        resumed = create_store(tmp_path / "s", later)
        assert resumed.done_shards().tolist() == [False, True, False, False]
        assert resumed.attrs["created"] == config.created  # the original store, not a new one
        write_all(resumed, values, shards=[0, 2, 3])
    assert not list((tmp_path / "s").rglob("*.partial"))
    np.testing.assert_array_equal(
        open_cache(tmp_path / "s").read_rows(slice(0, 15)), values.astype(np.float16).astype(np.float32)
    )


def test_different_config_is_refused_with_each_difference(tmp_path):
    build(tmp_path / "s")
    other = make_config(
        dtype="int8",
        layers=(2,),
        episodes=EPISODES[:2],
        source={"format": "libero_hdf5", "path": "/data/libero", "fingerprint": "def", "rotate": True},
    )
    with lock_store(tmp_path / "s"), pytest.raises(ConfigMismatch) as info:
        create_store(tmp_path / "s", other)
    assert set(info.value.differences) == {"targets.dtype", "targets.layers", "source.fingerprint", "episodes"}
    message = str(info.value)
    assert "targets.dtype: store has 'float16', asked 'int8'" in message
    assert "episodes: store has '3 episodes, 15 steps', asked '2 episodes, 12 steps'" in message
    assert open_cache(tmp_path / "s").dtype == "float16"


def test_overwrite_replaces_a_store_but_never_a_foreign_directory(tmp_path):
    build(tmp_path / "s")
    with lock_store(tmp_path / "s"):
        fresh = create_store(tmp_path / "s", make_config(dtype="bfloat16"), overwrite=True)
        assert fresh.dtype == "bfloat16" and not fresh.done_shards().any()
    assert zarr.open_array(str(tmp_path / "s"), path="targets/layer_3", mode="r").dtype == np.uint16
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with lock_store(foreign), pytest.raises(StoreError, match="not an sfcache store; refusing"):
        create_store(foreign, make_config(), overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_interrupted_creation_is_recreated(tmp_path):
    path = tmp_path / "s"
    zarr.create_group(store=str(path), zarr_format=3, attributes={"sfcache_creating": True})
    with pytest.raises(StoreError, match="not an sfcache store: .*its creation was interrupted"):
        open_cache(path)
    with lock_store(path):
        cache = create_store(path, make_config())
    assert cache.num_shards == 4 and not cache.done_shards().any()


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="not an sfcache store: .*does not exist"):
        open_cache(tmp_path / "nothing")


# ----------------------------------------------------------------------------- lock


def test_second_locker_is_refused_with_instructions(tmp_path):
    with lock_store(tmp_path / "s") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(
            StoreError, match=r"\.sfcache\.lock: store is locked by pid \d+ .*released when it ends\). Wait for it"
        ):
            with lock_store(tmp_path / "s"):
                pass
        assert lock.exists()
    assert not lock.exists() and not (tmp_path / "s").exists()  # a lock that wrote nothing leaves no directory
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="is a file"):
        with lock_store(tmp_path / "file"):
            pass


@pytest.mark.parametrize("leftover", ["dead pid here", "dead pid elsewhere", "empty", "garbage"])
def test_a_leftover_lock_file_nobody_holds_never_blocks(tmp_path, leftover):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "s" / ".sfcache.lock"
    lock.parent.mkdir()
    lock.write_text(
        {
            "dead pid here": json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}),
            "dead pid elsewhere": json.dumps({"pid": 1, "host": "another-node", "started": 0}),
            "empty": "",
            "garbage": "\x00{not json",
        }[leftover]
    )  # e.g. a disk that filled up mid-write
    with lock_store(tmp_path / "s"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_held_lock_is_refused_whatever_pid_it_names(tmp_path):
    """A pid check would call this holder dead (its pid is gone here, as for a process in another PID
    namespace or container); the flock it holds open says it is alive."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with lock_store(tmp_path / "s") as lock:
        lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}))
        with pytest.raises(StoreError, match=f"store is locked by pid {int(dead.stdout)} on host"):
            with lock_store(tmp_path / "s"):
                pass
        lock.write_text("garbage")
        with pytest.raises(StoreError, match="locked by a running process .its lock file names no owner."):
            with lock_store(tmp_path / "s"):
                pass


def test_shard_files_reach_the_disk_before_their_done_flag(tmp_path, monkeypatch):
    import sfcache.store.writer as store_module

    config = make_config(dtype="int8")
    values = targets_for(config)
    synced = []

    def recording_fsync(descriptor):
        synced.append((os.readlink(f"/proc/self/fd/{descriptor}"), (tmp_path / "s" / "done" / "c" / "0").exists()))

    monkeypatch.setattr(store_module.os, "fsync", recording_fsync)
    with lock_store(tmp_path / "s"):
        create_store(tmp_path / "s", config).write_shard(0, {LAYER: values[:4]})
    names = [path.removeprefix(str(tmp_path / "s") + "/") for path, _ in synced if "/targets/" in path]
    assert names == [
        "targets/layer_3/c/0/0/0/0",
        "targets/layer_3/c/0/0/0",
        "targets/layer_3_scale/c/0/0/0/0",
        "targets/layer_3_scale/c/0/0/0",
    ]
    assert not any(done_flag_existed for _, done_flag_existed in synced)
    assert open_cache(tmp_path / "s").done_shards().tolist() == [True, False, False, False]
