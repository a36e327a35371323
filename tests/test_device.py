"""Device-side extraction path, run with the CPU as the device: preprocessing in two stages, the cast to the
stored dtype, host copies, pre-encoded shard writes, the store and GPU benchmarks' dry runs."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from distributed import LocalCluster
from typer.testing import CliRunner

import bench.gpu
import bench.store
from sfcache.cli.main import app
from sfcache.device import HostCopy, encode_on_device, pinned, resolve_device, to_device
from sfcache.errors import SfcacheError, StoreError
from sfcache.sources.base import EpisodeInfo
from sfcache.store import StoreConfig, create_store, decode, encode, lock_store, open_cache, pack_episodes
from sfcache.vggt.preprocess import (
    MODES,
    device_images,
    host_frames,
    output_size,
    preprocess,
    resize_like_rlds,
    resize_like_rlds_tensor,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (200, 320)])
@pytest.mark.parametrize("mode", MODES)
def test_device_stage_on_cpu_equals_preprocess(mode, size):
    frames = np.random.default_rng(sum(size)).integers(0, 256, (2, 2, *size, 3), dtype=np.uint8)
    staged = host_frames(frames, mode, 112)
    assert staged.dtype == np.uint8  # only uint8 frames cross to the device
    if mode == "sf":
        assert staged is frames  # sf (TF lanczos3 included) runs wholly on the device
    images = device_images(to_device(pinned(staged, CPU), CPU), mode, 112, size)
    expected = preprocess(frames, mode, 112)
    assert images.dtype == torch.float32 and torch.equal(images, expected)
    assert tuple(images.shape[-2:]) == output_size(staged, mode, 112)


def test_device_lanczos_is_bit_exact_after_uint8_rounding():
    """The lanczos3 taps on a device tensor against the numpy-in path: no pixel off by even one level."""
    frames = np.random.default_rng(3).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    on_device = resize_like_rlds_tensor(torch.from_numpy(frames).to(CPU), 224, 224).numpy()
    off_by = np.abs(on_device.astype(int) - resize_like_rlds(frames, 224, 224).astype(int))
    assert off_by.max() == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_encode_on_device_equals_store_encode_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 2, 4, 256), dtype=np.float32) * 10
    values[0, 0, 0, :128] = 0.0  # an all-zero int8 block
    ties = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8)], np.float32)  # bf16 half-way cases
    values[1, 1, 1, :3] = ties
    stored, scale = HostCopy({0: encode_on_device(torch.from_numpy(values), dtype)}).get()[0]
    want, want_scale = encode(values, dtype)
    assert stored.dtype == want.dtype and np.array_equal(stored, want)
    assert (scale is None) == (want_scale is None)
    if scale is not None:
        assert np.array_equal(scale, want_scale)


def _config(dtype: str, steps: int = 4) -> StoreConfig:
    return StoreConfig(
        episodes=pack_episodes([EpisodeInfo("e", "", steps)]),
        layers=(0,),
        grid=(2, 2),
        native_grid=(4, 4),
        aspect_ratio=1.0,
        views=("a", "b"),
        channels=256,
        vggt={"config": {"depth": 1}},
        source={},
        dtype=dtype,
        steps_per_shard=steps,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_pre_encoded_shard_equals_the_float32_write(tmp_path, dtype):
    values = np.random.default_rng(1).standard_normal((4, 2, 4, 256), dtype=np.float32)
    for name, given in (("float", values), ("encoded", encode(values, dtype))):
        with lock_store(tmp_path / name):
            create_store(tmp_path / name, _config(dtype)).write_shard(0, {0: given})
    a, b = (
        open_cache(tmp_path / "float").read_rows(slice(0, 4)),
        open_cache(tmp_path / "encoded").read_rows(slice(0, 4)),
    )
    stored, scale = encode(values, dtype)
    assert np.array_equal(a, b) and np.array_equal(a, decode(stored, dtype, scale))


def test_pre_encoded_shard_of_another_dtype_is_refused(tmp_path):
    values = np.zeros((4, 2, 4, 256), np.float32)
    with lock_store(tmp_path / "s"):
        cache = create_store(tmp_path / "s", _config("int8"))
        with pytest.raises(StoreError, match="stored as float16, expected int8"):
            cache.write_shard(0, {0: encode(values, "float16")})
        assert not cache.done_shards()[0]


def test_store_bench_reports_write_rates_against_a_plain_write(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.store, "STEPS_PER_SHARD", 2)  # real [*, 2, 256, 2048] steps, fewer of them
    monkeypatch.setitem(bench.store.PRESETS, "tiny", {"shards": 1, "repeats": 1})
    rows = {row["metric"]: row for row in bench.store.run(tmp_path, "tiny")}
    for dtype in ("float16", "bfloat16", "int8"):
        row = rows[f"write_mib_per_s_{dtype}"]
        assert row["value"] > 0 and row["baseline"] > 0 and row["unit"] == "MiB/s"
        assert "[2, 2, 256, 2048]" in row["notes"]
    assert {
        "write_mib_per_s_float16_checksum",
        "write_mib_per_s_int8_zstd",
        "write_mib_per_s_float16_cpu_encode",
    } <= set(rows)
    for metric in ("digest_mib_per_s", "read_mib_per_s_verify", "read_mib_per_s_checksum"):  # integrity costs
        assert rows[metric]["value"] > 0 and rows[metric]["baseline"] > 0, metric
        assert "[2, 2, 256, 2048] float16" in rows[metric]["notes"]


def test_gpu_bench_dry_runs_on_cpu_with_the_tiny_preset(tmp_path):
    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        rows = bench.gpu.run(tmp_path, "tiny", batches=(1, 4), device="cpu", scheduler=cluster.scheduler_address)
    assert [row["batch"] for row in rows] == [1, 4]
    for row in rows:
        assert row["steps"] == 32 and row["extract_steps_per_s"] > 0 and row["bare_steps_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["extract_steps_per_s"] / row["bare_steps_per_s"])
        assert row["cpu_cores_busy_machine"] >= 0
        assert row["lanczos_max_levels_off"] == 0 and row["preprocess_max_abs_diff"] == 0.0  # the CPU is the device


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_direct_shard_files_are_byte_identical_to_zarrs(tmp_path, dtype, checksum):
    """Rows 0-7 in two full shards and a last one of 2 rows past which the array ends (10 steps)."""
    from sfcache.shard_file import direct_layout

    values = np.random.default_rng(2).standard_normal((10, 2, 4, 256), dtype=np.float32) + 0.5
    config = StoreConfig(
        episodes=pack_episodes([EpisodeInfo("e", "", 10)]),
        layers=(0,),
        grid=(2, 2),
        native_grid=(4, 4),
        aspect_ratio=1.0,
        views=("a", "b"),
        channels=256,
        vggt={},
        source={},
        dtype=dtype,
        checksum=checksum,
        steps_per_shard=4,
    )
    with lock_store(tmp_path / "ours"):
        ours = create_store(tmp_path / "ours", config)
        for shard in range(3):
            ours.write_shard(shard, {0: values[ours.shard_rows(shard)]})
    with lock_store(tmp_path / "zarr"):
        theirs = create_store(tmp_path / "zarr", config)
        for name, part in zip(("targets/layer_0", "targets/layer_0_scale"), encode(values, dtype)):
            if part is not None:
                assert direct_layout(theirs._array(name)) is checksum
                theirs._array(name)[:] = part  # zarr's own codec pipeline
    files = sorted(
        p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours" / "targets").rglob("c/*/*/*/*") if p.is_file()
    )
    assert len(files) == (6 if dtype == "int8" else 3)
    for file in files:
        assert (tmp_path / "ours" / file).read_bytes() == (tmp_path / "zarr" / file).read_bytes(), file
    assert np.array_equal(
        open_cache(tmp_path / "ours").read_rows(slice(0, 10)),
        decode(*encode(values, dtype)[:1], dtype, encode(values, dtype)[1]),
    )


@pytest.mark.parametrize("store_dtype", ["float16", "int8"])
def test_cached_targets_in_float16_and_on_a_device_equal_the_float32_read(tmp_path, store_dtype):
    from sfcache.torch import CachedTargets

    values = np.random.default_rng(4).standard_normal((4, 2, 4, 256), dtype=np.float32)
    with lock_store(tmp_path / "s"):
        create_store(tmp_path / "s", _config(store_dtype)).write_shard(0, {0: values})
    rows = [3, 0, 3, 1]
    reference = CachedTargets(tmp_path / "s").read_rows(rows)
    half = CachedTargets(tmp_path / "s", dtype=torch.float16).read_rows(rows)
    on_device = CachedTargets(tmp_path / "s", device="cpu").read_rows(rows)
    assert half.dtype == torch.float16 and torch.equal(half, reference.half())
    assert on_device.dtype == torch.float32 and torch.equal(on_device, reference)
    if store_dtype == "int8":
        with pytest.raises(StoreError, match="only float16 stores"):
            open_cache(tmp_path / "s").read_rows([0], decoded=False)


def test_a_failed_direct_shard_write_leaves_no_partial_file_and_the_shard_not_done(tmp_path, monkeypatch):
    import sfcache.shard_file as shard_file

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    values = np.ones((4, 2, 4, 256), np.float32)
    with lock_store(tmp_path / "s"):
        cache = create_store(tmp_path / "s", _config("float16"))
        monkeypatch.setattr(shard_file.os, "replace", disk_full)
        with pytest.raises(StoreError, match="writing shard 0 .rows 0-3. failed.*No space left"):
            cache.write_shard(0, {0: values})
    assert not list(tmp_path.rglob("*.partial")) and not open_cache(tmp_path / "s").done_shards()[0]


@pytest.mark.parametrize(
    "asked, gpus, expected",
    [("auto", 0, "cpu"), ("auto", 2, "cuda"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda"), ("cuda:1", 2, "cuda:1")],
)
def test_every_device_word_resolves_by_the_gpus_the_computing_machine_sees(asked, gpus, expected):
    assert resolve_device(asked, gpus) == torch.device(expected)


@pytest.mark.parametrize(
    "asked, gpus, message",
    [
        ("gpu", 1, "device 'gpu': expected auto | cpu | cuda | cuda:N"),
        ("cuda:", 1, "expected auto | cpu | cuda | cuda:N"),
        ("cuda", 0, "device cuda: no CUDA GPU is visible here"),
        ("cuda:2", 2, "device cuda:2: only 2 CUDA GPU(s) are visible here (cuda:0..cuda:1)"),
    ],
)
def test_a_device_that_is_not_there_or_not_a_device_is_one_clear_error(asked, gpus, message):
    with pytest.raises(SfcacheError, match=re.escape(message)):
        resolve_device(asked, gpus)


@pytest.mark.parametrize("command", ["extract", "train", "eval-libero", "inspect-cache", "reproduce-libero"])
def test_every_command_names_the_same_device_choices(command):
    help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    assert "auto | cpu | cuda | cuda:N" in re.sub(r"[│\s]+", " ", help_text)  # the help box wraps lines
