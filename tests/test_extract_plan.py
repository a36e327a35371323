"""The extraction plan (one object for --dry-run and the real run), the typed task report, and errors that name
config fields in the library and flags on the command line."""

from __future__ import annotations

import logging
import pickle

import pytest
from distributed import LocalCluster

import sfcache.extract.run as extract_run
from sfcache.cli.main import main
from sfcache.errors import Field, Message, SfcacheError, SourceError
from sfcache.extract import ExtractConfig, ShardFailure, TaskReport, extract, plan
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import open_cache
from sfcache.train.reproduce import ReproduceConfig
from tests._cli_helpers import run_main


@pytest.fixture(scope="module")
def in_process():
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as cluster:  # fmt: skip
        yield cluster.scheduler_address


def test_the_dry_run_and_the_real_run_share_one_plan_built_once(tmp_path, in_process, monkeypatch):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=3, size=64)
    cfg = ExtractConfig(source=written.path, out=tmp_path / "store", vggt="random:tiny", layers=(1, -1), grid=(4, 4),
                        steps_per_shard=2, scheduler=in_process)  # fmt: skip
    dry = plan(cfg)
    built, original = [], extract_run.make_plan
    monkeypatch.setattr(extract_run, "make_plan", lambda *args: built.append(original(*args)) or built[-1])
    summary = extract(cfg, progress=False)
    (real,) = built  # once per run
    for name in ("layers", "grid", "native_grid", "frame_size", "steps", "shards", "bytes_per_step", "aspect_ratio"):
        assert getattr(real, name) == getattr(dry, name), name
    assert real.selection.layout == dry.selection.layout and real.model == dry.model
    cache = open_cache(cfg.out)
    assert cache.num_shards == dry.shards == 3 and cache.num_steps == dry.steps == 6
    assert cache.layers == dry.layers == (1, 3) and tuple(cache.grid) == dry.grid == (4, 4)
    assert summary.views == list(dry.selection.layout) and summary.layers == list(dry.layers)
    assert dry.facts()["store_bytes_uncompressed"] == dry.bytes_per_step * dry.steps


def test_a_task_report_survives_the_dask_boundary():
    batch_size = Field("ExtractConfig", "batch_size")
    failure = ShardFailure.of(3, SourceError("data.hdf5", "truncated", episode="demo_1", key="obs/agentview_rgb"))
    report = TaskReport(
        host="node7",
        store="/shared/store",
        written={2: {"targets/layer_23": [1024, 77]}},
        adopted=[2],
        failed=[failure],
        error=Message("shard 4 failed on node7: out of memory; lower ", batch_size),
        error_shard=4,
        traceback="Traceback ...",
    )
    back = pickle.loads(pickle.dumps(report))
    assert back == report and back.error.fields == (batch_size,)
    assert (
        str(back.failed[0].error())
        == "data.hdf5, episode demo_1, key 'obs/agentview_rgb': truncated (shard 3 left not done)"
    )


def test_a_library_error_names_the_config_field_and_sf_prints_its_flag(tmp_path, capsys):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=1, steps=2, size=32)
    with pytest.raises(SfcacheError) as raised:
        ExtractConfig(source=written.path, out=tmp_path / "s", batch_size=0, min_cosine=0.5)
    assert str(raised.value) == (
        "ExtractConfig.batch_size must be >= 1, got 0; ExtractConfig.min_cosine applies only with "
        "ExtractConfig.reduce pca:K or pca:auto"
    )
    assert Field("ExtractConfig", "reduce") in raised.value.message.fields
    assert pickle.loads(pickle.dumps(raised.value)).message == raised.value.message  # Dask carries it whole
    code, output = run_main(
        main, capsys, "extract", written.path, "--out", tmp_path / "s", "--batch-size", "0", "--min-cosine", "0.5"
    )
    assert code == 2 and output.startswith(
        "error: --batch-size must be >= 1, got 0; --min-cosine applies only with --reduce pca:K or pca:auto"
    ), output


def test_a_command_handing_options_on_under_other_names_prints_its_own_flags(tmp_path, capsys):
    """reproduce-libero's --extract-batch-size is ExtractConfig.batch_size: the check is ExtractConfig's, the
    message names reproduce's field, the command line its flag."""
    problems = ReproduceConfig(extract_batch_size=0, out=tmp_path / "o").problems()
    (message,) = [p for p in problems if isinstance(p, Message) and p.fields]
    assert str(message) == "ReproduceConfig.extract_batch_size must be >= 1, got 0"
    code, output = run_main(
        main, capsys, "reproduce-libero", "--libero-dir", tmp_path, "--vggt", "random:tiny", "--out", tmp_path / "o",
        "--extract-batch-size", "0", "--probe-steps", "0",
    )  # fmt: skip
    assert code == 2 and "--extract-batch-size must be >= 1, got 0" in output and "--batch-size must" not in output
    assert "--probe-steps must be >= 1, got 0" in output and "ProbeConfig" not in output and "FitSettings" not in output
