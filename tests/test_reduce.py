"""Compact stores (--reduce pca:K | pca:auto): fit, fidelity, identity across kills, refusal, loaders."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from sfcache.cli.main import app
from sfcache.errors import ConfigMismatch, SfcacheError
from sfcache.extract import ExtractConfig, extract
from sfcache.reduce import Moments, check_fidelity, fit, parse_reduce, request, sample_rows
from sfcache.sources.base import EpisodeInfo
from sfcache.store import (
    Reduction,
    StoreConfig,
    create_store,
    lock_store,
    open_cache,
    pack_episodes,
    resumable_reduction,
)
from sfcache.torch import CachedTargets
from tests._cli_helpers import sf_command
from tests.test_faults import REPO, SHARDED, assert_equal_stores, done_count, kill_process_group

REDUCE = ["--reduce", "pca:8", "--min-cosine", "0.5"]


def low_rank(
    steps: int, rank: int, channels: int, noise: float, seed: int = 0, tokens: int = 6, views: int = 2
) -> np.ndarray:
    """float32 [steps, views, tokens, C]: an offset, `rank` signal directions (std 1..2) and isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((channels, rank)))[0].T  # [rank, C] orthonormal
    size = (steps, views, tokens)
    signal = (rng.standard_normal((*size, rank)) * np.linspace(2.0, 1.0, rank)) @ basis
    offset = rng.standard_normal(channels) * 0.5
    return (offset + signal + noise * rng.standard_normal((*size, channels))).astype(np.float32)


def fitted(
    values: np.ndarray, asked: str, min_cosine: float | None, dtype: str = "float16", mask: np.ndarray | None = None
):
    """Fit as `extract` does: sample rows of `values`, moments of the fit rows, held-out rows measured."""
    fit_rows, held_rows = sample_rows(len(values))
    moments = Moments(values.shape[-1])
    moments.add(
        values[fit_rows][mask[fit_rows]] if mask is not None else values[fit_rows].reshape(-1, values.shape[-1])
    )
    held = (values[held_rows], None if mask is None else mask[held_rows])
    return fit(request(asked, min_cosine, len(values)), {0: moments}, {0: held}, dtype)


def write_reduced(
    path: Path,
    values: np.ndarray,
    asked: str,
    min_cosine: float | None = None,
    dtype: str = "float16",
    mask: np.ndarray | None = None,
):
    steps, views, tokens, channels = values.shape
    reduction = fitted(values, asked, min_cosine, dtype, mask)
    config = StoreConfig(
        episodes=pack_episodes([EpisodeInfo("a", "", steps // 2), EpisodeInfo("b", "", steps - steps // 2)]),
        layers=(0,),
        grid=(2, tokens // 2),
        native_grid=(4, 4),
        aspect_ratio=1.0,
        views=("primary", "wrist")[:views],
        channels=channels,
        vggt={"config": {"depth": 4}},
        source={},
        dtype=dtype,
        steps_per_shard=8,
        reduce=reduction,
        token_mask=mask is not None,
    )
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(config.num_shards):
            rows = cache.shard_rows(shard)
            cache.write_shard(shard, {0: values[rows]}, None if mask is None else mask[rows])
    return open_cache(path)


@pytest.mark.parametrize("k", [12, 20])
def test_reconstruction_error_matches_the_noise_left_outside_k_components(tmp_path, k):
    channels, rank, noise = 64, 12, 0.05
    values = low_rank(400, rank, channels, noise)
    cache = write_reduced(tmp_path / "store", values, f"pca:{k}")
    back = cache.read_rows(slice(None))
    assert back.dtype == np.float32 and back.shape == values.shape
    residual = ((back - values) ** 2).sum(-1).mean()
    expected = (channels - k) * noise**2  # every direction beyond the signal holds noise variance only
    assert residual == pytest.approx(expected, rel=0.08)
    fidelity = cache.provenance.targets.reduce.fidelity[0]
    assert fidelity.k == k and fidelity.worst <= fidelity.p1 <= fidelity.mean < 1
    assert cache.provenance.targets.reduce.bytes_per_step == 2 * 6 * k * 2  # views x tokens x K x float16


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_auto_picks_the_smallest_k_that_reaches_the_cosine(tmp_path, dtype):
    values = low_rank(300, 24, 128, 0.05, tokens=8)
    reduction = fitted(values, "pca:auto", 0.99, dtype)
    assert len(reduction.components[0]) == 24  # 16 components miss a third of the signal
    assert reduction.fidelity["0"]["mean"] >= 0.99
    assert fitted(values, "pca:auto", 0.9, dtype).fidelity["0"]["k"] == 16  # held-out cosine 0.937 at K=16
    np.testing.assert_allclose(reduction.components[0] @ reduction.components[0].T, np.eye(24), atol=1e-5)
    check_fidelity(reduction)
    noise = np.random.default_rng(2).standard_normal((40, 2, 8, 32)).astype(np.float32)  # no low-rank structure
    with pytest.raises(SfcacheError, match="only with all 32 channels, so nothing is saved"):
        check_fidelity(fitted(noise, "pca:auto", 0.999, dtype))


def test_reduce_values_are_parsed_and_auto_needs_a_cosine(tmp_path):
    assert parse_reduce("none") is None and parse_reduce("pca:64") == 64 and parse_reduce("pca:auto") == "auto"
    for bad in ("pca", "pca:0", "svd:8", "pca:x"):
        with pytest.raises(SfcacheError, match="ExtractConfig.reduce must be"):
            parse_reduce(bad)
    with pytest.raises(SfcacheError, match="pca:auto needs ExtractConfig.min_cosine"):
        ExtractConfig(source=tmp_path, out=tmp_path / "o", vggt="random:tiny", reduce="pca:auto")
    with pytest.raises(SfcacheError, match="ExtractConfig.min_cosine applies only with ExtractConfig.reduce"):
        ExtractConfig(source=tmp_path, out=tmp_path / "o", vggt="random:tiny", min_cosine=0.9)


def test_loaders_return_rebuilt_float32_targets_and_masks_still_work(tmp_path):
    values = low_rank(24, 6, 32, 0.01, tokens=8)
    mask = np.random.default_rng(1).random(values.shape[:3]) > 0.3
    cache = write_reduced(tmp_path / "store", values, "pca:8", mask=mask)
    exact = cache.read_rows(slice(None))
    assert exact.shape == values.shape and exact.dtype == np.float32
    assert (cache.read("b", 2)[0] == exact[14]).all()
    targets = CachedTargets(tmp_path / "store", add_position_embedding=False)
    item, item_mask = targets[5]
    assert item.dtype == torch.float32 and tuple(item.shape) == (2, 8, 32)
    torch.testing.assert_close(item, torch.from_numpy(exact[5]))
    assert (item_mask.numpy() == mask[5]).all()
    with_pos = CachedTargets(tmp_path / "store")
    compact = CachedTargets(tmp_path / "store", coefficients=True)
    coefficients, batch_mask = compact.read_rows([3, 9, 3])
    assert tuple(coefficients.shape) == (3, 2, 8, 8) and (batch_mask.numpy() == mask[[3, 9, 3]]).all()
    torch.testing.assert_close(compact.reconstruct(coefficients, "cpu"), with_pos.read_rows([3, 9, 3])[0])
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(exact), torch.from_numpy(values), dim=-1)
    assert cosine[torch.from_numpy(mask)].mean() > 0.99


def test_a_store_resumes_with_its_stored_basis_and_refuses_another_reduce_before_any_fit(tmp_path):
    values = low_rank(24, 6, 32, 0.01, tokens=8)
    cache = write_reduced(tmp_path / "store", values, "pca:8")
    stored = cache.reduction
    config = StoreConfig(**{**_config_fields(cache), "reduce": Reduction(stored.request)})
    again = resumable_reduction(tmp_path / "store", config)
    np.testing.assert_array_equal(again.components[0], stored.components[0])
    other = replace(config, reduce=Reduction(request("pca:16", None, 24)))
    with pytest.raises(ConfigMismatch, match="targets.reduce.asked"):
        resumable_reduction(tmp_path / "store", other)
    assert resumable_reduction(tmp_path / "store", other, overwrite=True) is None


def _config_fields(cache) -> dict:
    """The StoreConfig fields `write_reduced` used, read back from the store."""
    provenance, targets = cache.provenance, cache.provenance.targets
    return dict(
        episodes=provenance.episodes,
        layers=cache.layers,
        grid=cache.grid,
        native_grid=targets.native_grid,
        aspect_ratio=targets.aspect_ratio,
        views=cache.views,
        channels=cache.channels,
        vggt=provenance.vggt.to_attrs(),
        source=provenance.source,
        dtype=cache.dtype,
        steps_per_shard=cache.steps_per_shard,
        created=provenance.created,
    )


# ----------------------------------------------------------------------------- through the extractor


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from sfcache.sources.synthetic import write_libero_hdf5

    return write_libero_hdf5(tmp_path_factory.mktemp("reduce") / "data", tasks=1, demos=3, steps=4, size=64).path


@pytest.fixture(scope="module")
def scheduler():
    import logging

    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        yield cluster.scheduler_address


def reduced_extract(dataset: Path, out: Path) -> list[str]:
    """`sf extract --reduce` with its own local cluster of one worker process."""
    return sf_command("extract", dataset, "--out", out, *SHARDED, *REDUCE, "--workers", "1")


def sf_extract_process(dataset: Path, out: Path) -> str:
    """`sf extract --reduce` with its own 1-worker cluster, as the runs killed below: a reduced store's host
    projection runs in a Dask worker process (single-threaded BLAS) there, and differs in the last bit on some
    rows from an in-process worker's (this process's BLAS is threaded). Returns its output, one line."""
    command = reduced_extract(dataset, out)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return " ".join(done.stdout.split())


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reduced") / "store"
    assert "basis fitted" in sf_extract_process(dataset, out)
    return out


def test_extract_records_fidelity_shown_by_inspect_and_rechecked_by_verify(reference):
    cache = open_cache(reference)
    reduce = cache.provenance.targets.reduce
    assert reduce.asked == "pca:8" and reduce.k == {cache.layers[0]: 8}
    assert reduce.sample_steps == 9 and reduce.held_out_steps == 3
    assert cache.read_rows([0, 11]).shape == (2, 2, 256, cache.channels)
    shown = CliRunner().invoke(app, ["inspect-cache", str(reference), "--verify", "4"])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert "pca:8" in text and "K=8" in text and "recorded held-out mean" in text


def test_verify_fails_a_reduced_store_whose_targets_fall_below_its_recorded_fidelity(reference, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(reference, copy)
    layer = open_cache(copy).layers[0]
    basis = zarr.open_array(str(copy / f"targets/layer_{layer}_basis"), mode="r+")
    basis[...] = np.linalg.qr(np.random.default_rng(0).standard_normal(basis.shape[::-1]))[0].T  # another basis
    shown = CliRunner().invoke(app, ["inspect-cache", str(copy), "--verify", "2"])
    assert shown.exit_code == 1 and "below the recorded mean" in " ".join(shown.output.split()), shown.output
    (copy / f"targets/layer_{layer}_mean/c/0").unlink()  # and a basis array lost: --check names it
    checked = CliRunner().invoke(app, ["inspect-cache", str(copy), "--check", "--json"])
    assert checked.exit_code == 1 and f"targets/layer_{layer}_mean" in checked.output, checked.output


def test_a_store_below_min_cosine_is_refused_and_not_written(dataset, scheduler, tmp_path):
    config = ExtractConfig(
        source=dataset,
        out=tmp_path / "store",
        vggt="random:tiny",
        steps_per_shard=2,
        batch_size=2,
        scheduler=scheduler,
        reduce="pca:1",
        min_cosine=0.9999,
    )
    with pytest.raises(SfcacheError, match=r"cosine 0\.\d+ with K=1, below ExtractConfig.min_cosine 0.9999; refusing"):
        extract(config, progress=False)
    assert not (tmp_path / "store" / "zarr.json").exists()


SLOW_FIT = """
import os, time
import sfcache.extract as extract
original = extract.VGGTWorker.sample
def sample(self, episodes, rows):
    time.sleep(0.3)
    out = original(self, episodes, rows)
    open(os.environ["SF_TEST_FIT_LOG"], "a").write(f"{rows}\\n")
    return out
extract.VGGTWorker.sample = sample
"""


def spawn_and_kill(dataset: Path, out: Path, env: dict, happened) -> None:
    """`sf extract --reduce` with its own 1-worker cluster, SIGKILLed with all its processes once `happened()`."""
    command = reduced_extract(dataset, out)
    victim = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not happened():
            assert victim.poll() is None, victim.stderr.read().decode()
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.01)
        kill_process_group(victim)
    finally:
        kill_process_group(victim)


def test_kill_9_during_then_after_the_fit_then_resume_equals_an_uninterrupted_run(dataset, reference, tmp_path):
    hooks, out, fit_log = tmp_path / "hooks", tmp_path / "store", tmp_path / "fit.log"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_FIT)  # slow sample batches, in the client and its workers
    slow = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]), "SF_TEST_FIT_LOG": str(fit_log)}
    spawn_and_kill(dataset, out, slow, fit_log.exists)  # killed with one sample batch of the fit done
    assert not (out / "zarr.json").exists()  # nothing of the fit was stored: the next run fits again
    spawn_and_kill(dataset, out, os.environ, lambda: done_count(out) >= 2)  # killed after its fit, mid-extraction
    assert (out / "zarr.json").exists() and done_count(out) < open_cache(reference).num_shards

    assert "basis reused" in sf_extract_process(dataset, out)  # the stored basis, never refitted
    assert_equal_stores(out, reference)  # so the refit after the first kill was bit-identical


def test_pca_auto_warns_when_its_worst_tokens_are_far_below_the_mean(caplog):
    """--min-cosine bounds the held-out mean: 1% of tokens off the basis pass it unseen unless warned about."""
    values = low_rank(300, 24, 128, 0.05, tokens=8)
    odd = np.random.default_rng(3).random(values.shape[:3]) < 0.01
    scale = np.linalg.norm(values, axis=-1, keepdims=True)
    stray = np.random.default_rng(4).standard_normal(values.shape).astype(np.float32)
    values = np.where(odd[..., None], stray / np.linalg.norm(stray, axis=-1, keepdims=True) * scale, values)
    reduction = fitted(values, "pca:auto", 0.98, "int8")
    figures = reduction.fidelity["0"]
    assert figures["mean"] >= 0.98 and figures["worst"] < 0.7 and figures["k"] <= 32
    with caplog.at_level("WARNING", logger="sfcache"):
        check_fidelity(reduction)  # passes --min-cosine, so it is written, but not silently
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: --reduce pca:auto: layer 0 K={figures['k']} rebuilds held-out tokens at mean cosine "
        f"{figures['mean']:.3f} but worst {figures['worst']:.3f} (--min-cosine bounds only the mean); some "
        "tokens lose most of their target: use a larger pca:K, or no --reduce"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sfcache"):
        check_fidelity(fitted(low_rank(300, 24, 128, 0.05, tokens=8), "pca:auto", 0.98, "int8"))
    assert caplog.records == []  # no tail: no warning
