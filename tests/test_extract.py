"""`sf extract` end to end: every source format, 1 and 2 Dask worker processes, resume, mismatch, lock,
bad data, write failures, kill -9 and resume. Tiny datasets and the random tiny VGGT keep this fast;
one process cluster per worker count is shared by the module (starting workers costs seconds)."""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from distributed import LocalCluster
from typer.testing import CliRunner

import sfcache.extract.run as extract_run
import sfcache.extract.worker as extract_worker
from sfcache.cli.main import app, main
from sfcache.device import resolve_device
from sfcache.errors import SfcacheError, StoreError
from sfcache.extract import ExtractConfig, VGGTWorker, extract
from sfcache.extract.plan import select
from sfcache.pooling import pool_grid
from sfcache.sources import FORMATS, open_source
from sfcache.sources.synthetic import write_lerobot, write_libero_hdf5, write_libero_rlds, write_robotwin
from sfcache.store import lock_store, open_cache, store_run
from sfcache.vggt import load_vggt, preprocess
from tests._cli_helpers import sf_command

REPO = Path(__file__).resolve().parents[1]
TINY = ["--vggt", "random:tiny", "--layers", "-1"]


@pytest.fixture(scope="module")
def schedulers():
    """Process clusters with 1 and 2 single-threaded workers, plus an in-process one (monkeypatch reaches it)."""
    common = dict(threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL)
    with (
        LocalCluster(n_workers=1, processes=True, **common) as one,
        LocalCluster(n_workers=2, processes=True, **common) as two,
        LocalCluster(n_workers=1, processes=False, **common) as local,
    ):
        yield {1: one.scheduler_address, 2: two.scheduler_address, "in-process": local.scheduler_address}


WRITERS = {
    "libero_hdf5": lambda root: write_libero_hdf5(root, tasks=1, demos=2, steps=2, size=64),
    "libero_rlds": lambda root: write_libero_rlds(root, episodes=2, steps=2, size=64),
    "lerobot": lambda root: write_lerobot(root, episodes=2, steps=2, size=64),
    "robotwin": lambda root: write_robotwin(root, tasks=1, episodes=2, steps=1, height=48, width=64),
}


@functools.cache
def tiny_vggt():
    return load_vggt("random:tiny", "cpu")[0]


def reference_targets(path: Path, grid=(16, 16), keys=None) -> dict[str, np.ndarray]:
    """What online SF computes per step, in this process: preprocess -> VGGTFeatures -> pool_grid."""
    model = tiny_vggt()
    source = open_source(path)
    expected = {}
    for info in source.episodes():
        if keys is not None and info.key not in keys:
            continue
        images = preprocess(source.read(info.key).frames, "sf", model.config.img_size)
        tokens = model(images, layers=(-1,))[-1]
        native = (images.shape[-2] // model.config.patch_size, images.shape[-1] // model.config.patch_size)
        expected[info.key] = pool_grid(tokens, native, grid).numpy()
    return expected


def assert_matches(cache, expected: dict[str, np.ndarray]) -> None:
    """fp16-stored targets equal the reference: cosine >= 0.9999 for every token."""
    assert cache.episodes == list(expected)
    for key, want in expected.items():
        got = cache.read(key)
        assert got.shape == want.shape
        cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cosine.min() >= 0.9999, (key, cosine.min())
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def run_cli(*args: str) -> CliRunner.Result:
    return CliRunner().invoke(app, ["extract", *map(str, args)], catch_exceptions=False)


def store_values(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {name: root[name][:] for name in ("targets/layer_3", "done")}


def test_the_format_tests_cover_every_registered_format():
    assert sorted(WRITERS) == sorted(FORMATS)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_matches_online_sf_with_1_and_2_workers(tmp_path, schedulers, fmt):
    written = WRITERS[fmt](tmp_path / "data")
    expected = reference_targets(written.path)
    for workers in (1, 2):
        out = tmp_path / f"store{workers}"
        result = run_cli(
            written.path,
            "--out",
            out,
            *TINY,
            "--steps-per-shard",
            2,
            "--batch-size",
            2,
            "--scheduler",
            schedulers[workers],
        )
        assert result.exit_code == 0, result.output
        assert f"{len(expected)} episodes" in result.output
        cache = open_cache(out)
        assert cache.done_shards().all() and not (out / ".sfcache.lock").exists()
        assert cache.attrs["source"]["format"] == written.format and cache.layers == (3,)
        assert cache.attrs["vggt"]["weights_id"] == "random:tiny+seed0"
        assert cache.attrs["targets"]["native_grid"] == [16, 16]
        assert_matches(cache, expected)


def test_resume_redoes_only_unfinished_shards_with_identical_values(tmp_path, schedulers):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=5, size=64)
    out = tmp_path / "store"
    args = [written.path, "--out", out, *TINY, "--steps-per-shard", 3, "--batch-size", 2, "--scheduler", schedulers[2]]
    assert run_cli(*args).exit_code == 0
    complete = store_values(out)
    root = zarr.open_group(str(out), mode="r+")
    root["done"][[1, 3]] = 0  # shards 1 and 3: rows 3-5 and 9
    root["targets/layer_3"][3:6] = 0
    root["targets/layer_3"][9:10] = 0
    assert open_cache(out).missing_episodes() == [k for k in open_cache(out).episodes]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "extracted 4 steps" in result.output and "6 were already done" in result.output
    resumed = store_values(out)
    np.testing.assert_array_equal(resumed["targets/layer_3"], complete["targets/layer_3"])
    assert resumed["done"].tolist() == [1, 1, 1, 1]
    again = run_cli(*args)  # nothing left: said so, not "extracted 0 steps (0.00 steps/s)"
    assert again.exit_code == 0 and f"{out} is already complete: 10 steps in 4 shards; nothing to do" in again.output
    assert "extracted 0" not in again.output


def test_other_configuration_is_refused_with_the_difference(tmp_path, schedulers, capsys):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=1, steps=2, size=64)
    out = tmp_path / "store"
    assert run_cli(written.path, "--out", out, *TINY, "--scheduler", schedulers["in-process"]).exit_code == 0
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "extract",
                str(written.path),
                "--out",
                str(out),
                *TINY,
                "--dtype",
                "int8",
                "--grid",
                "8x8",
                "--scheduler",
                schedulers["in-process"],
            ]
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "configuration differs" in err and "Traceback" not in err
    assert err.rstrip().endswith("; use --overwrite to replace it, or another --out"), err
    assert "targets.dtype: store has 'float16', asked 'int8'" in err
    assert "targets.grid: store has [16, 16], asked [8, 8]" in err
    assert open_cache(out).dtype == "float16" and not (out / ".sfcache.lock").exists()
    result = run_cli(
        written.path,
        "--out",
        out,
        *TINY,
        "--dtype",
        "int8",
        "--grid",
        "8x8",
        "--overwrite",
        "--scheduler",
        schedulers["in-process"],
    )
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS (random:tiny" in result.output and "carry no geometry" in result.output
    cache = open_cache(out)
    assert cache.dtype == "int8" and cache.grid == (8, 8) and cache.done_shards().all()
    want = reference_targets(written.path, grid=(8, 8))
    got = cache.read(cache.episodes[0])
    blocks = want[cache.episodes[0]].reshape(*got.shape[:3], -1, 128)  # int8: one scale per token, 128 channels
    scale = np.repeat(np.abs(blocks).max(axis=-1) / 127, 128, axis=-1)
    assert np.all(np.abs(got - want[cache.episodes[0]]) <= scale / 2 + 1e-3 * scale.max())


def test_a_locked_store_is_refused(tmp_path, capsys):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=1, steps=2, size=64)
    code = (
        "import sys, time; from sfcache.store import lock_store\n"
        "with lock_store(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exited:
            main(["extract", str(written.path), "--out", str(tmp_path / "store"), *TINY])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"store is locked by pid {holder.pid}" in err and "held open by a live process" in err
        assert ".sfcache.lock" in err and not (tmp_path / "store" / "zarr.json").exists()
    finally:
        holder.kill()
        holder.wait()


def _corrupt_robotwin_frame(path: Path, episode: int, step: int) -> str:
    """Overwrite one head-camera JPEG of a legacy RoboTwin episode with bytes no decoder accepts."""
    files = sorted(path.rglob(f"episode{episode}.hdf5"))
    with h5py.File(files[0], "r+") as h5:
        rgb = h5["observation/head_camera/rgb"]
        rgb[step] = b"not a jpeg".ljust(rgb.dtype.itemsize, b"\0")
    return str(files[0])


def test_bad_frames_fail_cleanly_or_are_skipped(tmp_path, schedulers, capsys):
    written = write_robotwin(tmp_path / "data", tasks=1, episodes=3, steps=2, height=48, width=64)
    bad_file = _corrupt_robotwin_frame(written.path, episode=1, step=1)
    out = tmp_path / "store"
    common = [
        str(written.path),
        "--out",
        str(out),
        *TINY,
        "--steps-per-shard",
        "2",
        "--batch-size",
        "2",
        "--scheduler",
        schedulers["in-process"],
    ]
    with pytest.raises(SystemExit) as exited:
        main(["extract", *common])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert bad_file in err and "episode" in err and "Traceback" not in err
    assert not (out / ".sfcache.lock").exists()

    result = run_cli(*common, "--skip-bad")
    assert result.exit_code == 1
    assert "failed shard 1" in result.output and "1 shard(s) not extracted" in result.output
    cache = open_cache(out)
    assert cache.done_shards().tolist() == [True, False, True]
    assert cache.missing_episodes() == [cache.episodes[1]]
    expected = reference_targets(written.path, keys={cache.episodes[0], cache.episodes[2]})
    for key in expected:
        np.testing.assert_allclose(cache.read(key), expected[key], rtol=2e-3, atol=2e-3 * np.abs(expected[key]).max())
    with pytest.raises(StoreError, match="not extracted yet"):
        cache.read(cache.episodes[1])


def test_a_write_failure_ends_the_run_and_marks_nothing_it_did_not_write(tmp_path, schedulers, monkeypatch):
    import sfcache.store.writer as store_module

    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=3, size=64)
    out = tmp_path / "store"
    original = zarr.storage.LocalStore.set
    calls = {"shard writes": 0}

    async def fail_after_first_shard(self, key, value, *args, **kwargs):
        if "/c/" in key and key.startswith("targets/"):
            calls["shard writes"] += 1
            if calls["shard writes"] > 1:
                raise OSError(28, "No space left on device")
        return await original(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", fail_after_first_shard)
    direct = store_module.write_shard_file  # uncompressed shards bypass zarr's LocalStore.set

    def direct_fail_after_first_shard(path, *args):
        calls["shard writes"] += 1
        if calls["shard writes"] > 1:
            raise OSError(28, "No space left on device")
        return direct(path, *args)

    monkeypatch.setattr(store_module, "write_shard_file", direct_fail_after_first_shard)
    cfg = ExtractConfig(
        source=written.path,
        out=out,
        vggt="random:tiny",
        layers=(-1,),
        steps_per_shard=2,
        batch_size=2,
        scheduler=schedulers["in-process"],
    )
    with pytest.raises(StoreError, match="writing shard .* failed.*No space left on device"):
        extract(cfg, progress=False)
    done = open_cache(out).done_shards()
    assert done.sum() == 1 and not (out / ".sfcache.lock").exists() and not (out / ".sfcache.stop").exists()


def test_a_reduce_shard_is_sized_as_the_float32_targets_a_worker_holds_until_the_write(
    tmp_path, schedulers, monkeypatch
):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=3, size=64)
    # random:tiny: 2 views x 256 tokens x 256 channels; int8 + scales 132 KiB a step, float32 512 KiB
    monkeypatch.setattr(extract_run, "MAX_SHARD_BYTES", 2 * 200 << 10)  # 2 int8 steps fit, 2 float32 do not
    cfg = ExtractConfig(source=written.path, out=tmp_path / "store", vggt="random:tiny", layers=(-1,), dtype="int8",
                        reduce="pca:4", steps_per_shard=2, scheduler=schedulers["in-process"])  # fmt: skip
    with pytest.raises(
        SfcacheError,
        match=r"ExtractConfig.steps_per_shard 2 with ExtractConfig.grid 16x16: .* \(0.5 MiB per step of float32\)",
    ):
        extract(cfg, progress=False)


def test_a_lease_expiring_mid_task_stops_it_at_its_next_batch_and_frees_the_model_as_it_ends(
    tmp_path, schedulers, monkeypatch
):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=3, size=64)
    out = tmp_path / "store"
    cfg = ExtractConfig(source=written.path, out=out, vggt="random:tiny", layers=(-1,), steps_per_shard=3,
                        batch_size=1, scheduler=schedulers["in-process"])  # fmt: skip
    extract(cfg, progress=False)
    open_cache(out, mode="r+").mark_not_done([0, 1])
    selection = select(cfg)
    computed, frees = [], []
    targets, free = VGGTWorker._targets, getattr(VGGTWorker, "_free_memory", lambda plugin: None)

    def lease_expires_during_the_second_batch(plugin, inputs, dtype):
        computed.append(dtype)
        result = targets(plugin, inputs, dtype)  # the model is in use when the lease removes the plugin
        if len(computed) == 2:
            plugin.teardown()
        return result

    monkeypatch.setattr(VGGTWorker, "_targets", lease_expires_during_the_second_batch)

    def recorded_free(plugin):
        frees.append(plugin.model)
        free(plugin)

    monkeypatch.setattr(VGGTWorker, "_free_memory", recorded_free, raising=False)
    with lock_store(out), store_run(out) as run:
        job = extract_worker.Job(
            source=selection.source, weights="random:tiny", device="cpu", layers=(-1,), grid=None,
            preprocess=cfg.preprocess, recipe=selection.recipe, layout=selection.layout, compute_dtype="auto",
            batch_size=1, skip_bad=False, store=out.resolve(),
            workers_per_host={}, run=run,
        )  # fmt: skip
        plugin = VGGTWorker(job, "sfcache-vggt-test")
        plugin.setup()
        report = plugin.run([0, 1])
    assert len(computed) == 2 and report.error is None and report.written == {}  # stopped, cleanly
    assert frees == [None, None]  # teardown's, then the task's own once it let go of the model


def test_episode_pattern_and_dry_run(tmp_path, schedulers):
    written = write_libero_hdf5(tmp_path / "data", tasks=2, demos=2, steps=2, size=64)
    keys = open_source(written.path).episodes()
    pattern = f"*{keys[2].key.split('/')[1]}*"
    dry = CliRunner().invoke(
        app, ["extract", str(written.path), "--out", str(tmp_path / "store"), *TINY, "--episodes", pattern, "--dry-run"]
    )
    assert dry.exit_code == 0, dry.output
    assert "episodes: 2" in dry.output and "steps: 4" in dry.output and "views: primary, wrist" in dry.output
    assert f"bytes per step: {2 * 256 * 256 * 2:,}" in dry.output and not (tmp_path / "store").exists()
    assert "grid: 16x16" in dry.output and "[" not in dry.output and "'" not in dry.output  # no Python reprs
    bare = [str(written.path), "--out", str(tmp_path / "store"), "--dry-run"]  # no --vggt: the plan, and what it needs
    no_vggt = CliRunner().invoke(app, ["extract", *bare])
    assert no_vggt.exit_code == 0, no_vggt.output
    assert "vggt: none given; a run needs --vggt (facebook/VGGT-1B" in no_vggt.output
    assert f"bytes per step: {2 * 256 * 2048 * 2:,}" in no_vggt.output  # VGGT-1B's 2048 channels
    refused = CliRunner().invoke(app, ["extract", *bare[:-1]])
    assert isinstance(refused.exception, SfcacheError) and "--vggt is needed to extract" in str(refused.exception)
    assert f"device: {resolve_device('auto')}" in dry.output
    no_gpu = CliRunner().invoke(
        app, ["extract", str(written.path), "--out", str(tmp_path / "store"), *TINY, "--device", "cuda:99", "--dry-run"]
    )  # refused, as the real run would be
    assert isinstance(no_gpu.exception, SfcacheError) and "--device cuda:99: " in str(no_gpu.exception)
    summary = extract(
        ExtractConfig(
            source=written.path,
            out=tmp_path / "store",
            vggt="random:tiny",
            layers=(-1,),
            episodes=pattern,
            scheduler=schedulers["in-process"],
        ),
        progress=False,
    )
    assert summary.episodes == 2 and summary.steps == 4 and summary.failed == []
    cache = open_cache(tmp_path / "store")
    assert cache.episodes == [k.key for k in keys[2:]] and cache.attrs["selection"] == pattern


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, schedulers):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=3, size=64)
    options = [*TINY, "--steps-per-shard", "1", "--batch-size", "1"]
    reference = tmp_path / "reference"
    assert run_cli(written.path, "--out", reference, *options, "--scheduler", schedulers[2]).exit_code == 0

    out = tmp_path / "store"
    command = sf_command("extract", written.path, "--out", out, *options, "--workers", "2")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after = random.Random().randint(1, 3)  # a random moment: after 1..3 of the 6 shards are done
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = out / "done" / "c"
        if done.exists() and len(list(done.iterdir())) >= kill_after:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = open_cache(out).done_shards()
    assert 1 <= killed.sum() < 6 and (out / ".sfcache.lock").exists()

    result = run_cli(written.path, "--out", out, *options, "--scheduler", schedulers[2])
    assert result.exit_code == 0, result.output
    assert f"{int(killed.sum())} were already done" in result.output
    resumed, uninterrupted = store_values(out), store_values(reference)
    np.testing.assert_array_equal(resumed["done"], uninterrupted["done"])
    np.testing.assert_array_equal(resumed["targets/layer_3"], uninterrupted["targets/layer_3"])
    assert not list(out.rglob("*.partial")) and not (out / ".sfcache.lock").exists()


def test_bad_options_are_one_line_errors_naming_each_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "extract",
                str(tmp_path),
                "--out",
                str(tmp_path / "store"),
                *TINY,
                "--dtype",
                "float8",
                "--batch-size",
                "0",
                "--codec",
                "lz4",
            ]
        )
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype must be one of float16, bfloat16, int8, not 'float8'" in err
    assert "--batch-size must be >= 1, got 0" in err and "--codec must be one of none, zstd, blosc-zstd" in err
    with pytest.raises(SystemExit) as exited:
        main(["extract", str(tmp_path), "--out", str(tmp_path / "s"), *TINY, "--grid", "16"])
    assert exited.value.code == 2 and "--grid 16: expected HxW like 16x16, or native" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not (tmp_path / "s").exists()


def test_structurally_bad_episodes_are_left_out_with_skip_bad(tmp_path, schedulers):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=3, steps=2, size=64)
    broken_file = sorted(written.path.glob("*.hdf5"))[0]
    with h5py.File(broken_file, "r+") as h5:
        del h5["data/demo_1/obs/eye_in_hand_rgb"]
    result = run_cli(written.path, "--out", tmp_path / "store", *TINY, "--skip-bad", "--scheduler", schedulers[1])
    assert result.exit_code == 0, result.output
    assert "skipped episode:" in result.output and "demo_1" in result.output
    cache = open_cache(tmp_path / "store")
    assert [key.rsplit("/", 1)[1] for key in cache.episodes] == ["demo_0", "demo_2"] and cache.done_shards().all()
