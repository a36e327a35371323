"""Crashes, worker deaths, failing disks, concurrent runs and bad input lose nothing and corrupt nothing.

Every fault is injected into a real run (the `sf` CLI in a subprocess, or `extract` on a Dask cluster this
test controls); afterwards the store must hold exactly what an uninterrupted run writes, value by value.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from distributed import Client, LocalCluster
from typer.testing import CliRunner

from sfcache.cli.main import app, main
from sfcache.errors import ConfigMismatch, ResumeMismatch, RunSuperseded, SourceError, StoreError
from sfcache.extract import ExtractConfig, extract
from sfcache.pooling import pool_grid
from sfcache.sources import open_source
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import is_locked, lock_store, open_cache
from sfcache.vggt import load_vggt, preprocess
from tests import test_sources_bad_input as bad
from tests._cli_helpers import sf_command
from tests._faults_helpers import LoggedSlowWrites, ReadOnlyAfter, TaskLog, running_tasks, sfcache_plugins
from tests._train_helpers import tree_digest, write_dataset, write_store

REPO = Path(__file__).resolve().parents[1]
TINY = ["--vggt", "random:tiny"]
SHARDED = [*TINY, "--steps-per-shard", "2", "--batch-size", "2"]
QUIET = dict(threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL)


@pytest.fixture(scope="module")
def scheduler():
    """An in-process cluster: re-runs and references are cheap, and monkeypatches reach its worker."""
    with LocalCluster(n_workers=1, processes=False, **QUIET) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """3 episodes x 4 steps: 6 shards of 2 steps."""
    return write_libero_hdf5(tmp_path_factory.mktemp("faults") / "data", tasks=1, demos=3, steps=4, size=64).path


@pytest.fixture(scope="module")
def reference(dataset, scheduler, tmp_path_factory) -> Path:
    """The store an uninterrupted run writes."""
    out = tmp_path_factory.mktemp("reference") / "store"
    assert sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler).exit_code == 0
    return out


OUTPUTS: list[
    str | Path
] = []  # every fault test's user-visible output (text, or a log file): none may hold a traceback


def sf_extract(*args) -> CliRunner.Result:
    result = CliRunner().invoke(app, ["extract", *map(str, args)], catch_exceptions=False)
    OUTPUTS.append(result.output)
    return result


def contents(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of a store and its provenance without the creation time."""
    root = zarr.open_group(str(path), mode="r")
    arrays = {
        "done": root["done"][:],
        **{f"targets/{name}": root["targets"][name][:] for name in root["targets"].array_keys()},
    }
    attrs = dict(root.attrs["sfcache"])
    attrs.pop("created")
    return arrays, attrs


def assert_equal_stores(path: Path, reference: Path) -> None:
    (got, got_attrs), (want, want_attrs) = contents(path), contents(reference)
    assert got_attrs == want_attrs
    assert sorted(got) == sorted(want)
    assert got["done"].all()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not list(path.rglob("*.partial")) and not (path / ".sfcache.lock").exists()
    check = CliRunner().invoke(app, ["inspect-cache", str(path), "--check"])
    assert check.exit_code == 0, check.output


def spawn_extract(dataset: Path, out: Path, log: Path) -> subprocess.Popen:
    """`sf extract` with its own local cluster (1 worker process), in a new process group."""
    command = sf_command("extract", dataset, "--out", out, *SHARDED, "--workers", "1")
    OUTPUTS.append(log)
    with log.open("wb") as stderr:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def done_count(out: Path) -> int:
    flags = out / "done" / "c"
    return len([f for f in flags.iterdir() if not f.name.endswith(".partial")]) if flags.exists() else 0


def kill_process_group(process: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL the client and every Dask process it started; none may survive. Returns the children killed."""
    if process.poll() is not None:
        return []
    children = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes survived the kill: {alive}"
    return children


# Moments to kill at: what must have happened, then a seeded random extra delay (seconds).
MOMENTS = {
    "cluster start": (lambda out, n: (out / ".sfcache.lock").exists(), (0.0, 1.5)),
    "store creation": (lambda out, n: (out / "zarr.json").exists(), (0.0, 0.2)),
    "late": (lambda out, n: done_count(out) >= n // 2, (0.0, 0.2)),
}


@pytest.mark.parametrize("moment, seed", [("cluster start", 1), ("store creation", 2), ("late", 3)])
def test_kill_9_of_the_whole_process_group_then_rerun_equals_an_uninterrupted_run(
    dataset, reference, scheduler, tmp_path, moment, seed
):
    happened, (low, high) = MOMENTS[moment]
    shards = open_cache(reference).num_shards
    out, log = tmp_path / "store", tmp_path / "victim.log"
    victim = spawn_extract(dataset, out, log)
    try:
        deadline = time.monotonic() + 120
        while not happened(out, shards):
            assert victim.poll() is None, f"the run ended before the kill: {log.read_text()}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(low, high))
        assert victim.poll() is None, log.read_text()
        children = kill_process_group(victim)
    finally:
        kill_process_group(victim)
    assert victim.returncode == -signal.SIGKILL
    assert moment == "cluster start" or children  # the Dask worker process died with its client
    killed_done = done_count(out)
    assert killed_done < shards

    resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert resumed.exit_code == 0, resumed.output
    assert_equal_stores(out, reference)
    assert f"{2 * killed_done} were already done" in resumed.output  # nothing done was redone


def test_a_worker_killed_mid_task_is_retried_on_the_survivor_and_every_shard_is_written_once(
    tmp_path, dataset, reference
):
    writes = tmp_path / "writes.log"
    out = tmp_path / "store"
    config = ExtractConfig(source=dataset, out=out, vggt="random:tiny", steps_per_shard=2, batch_size=2)
    with LocalCluster(n_workers=2, processes=True, **QUIET) as cluster, Client(cluster) as client:
        tasks = TaskLog()
        cluster.scheduler.add_plugin(tasks)
        client.register_plugin(LoggedSlowWrites(writes, delay=0.3), name="slow-writes")
        outcome: dict = {}
        run = threading.Thread(
            target=lambda: outcome.update(
                dataclasses.asdict(extract(replace(config, scheduler=cluster.scheduler_address), progress=False))
            )
        )
        run.start()
        deadline = time.monotonic() + 120
        victim = None
        while victim is None:
            assert run.is_alive() and time.monotonic() < deadline, "no task ran long enough to be interrupted"
            busy = {
                address: (pid, keys)
                for address, (pid, keys) in client.run(running_tasks).items()
                if any(key.startswith("sfcache-shards-") for key in keys)
            }
            if busy:
                address, (pid, keys) = next(iter(busy.items()))
                nanny = next(n for n in cluster.workers.values() if n.worker_address == address)
                nanny.close_gracefully()  # the dead worker is not replaced: the survivor must finish
                os.kill(pid, signal.SIGKILL)
                victim = (address, next(key for key in keys if key.startswith("sfcache-shards-")))
            time.sleep(0.02)
        run.join(timeout=180)
        assert not run.is_alive()
        survivors = set(cluster.scheduler.workers)

    address, key = victim
    assert outcome["failed"] == [] and outcome["shards_done"] == outcome["shards"] == 6
    assert outcome["already_done_steps"] == 0  # shards the dead worker wrote count once the client confirmed them
    finished = [worker for k, _, finish, worker in tasks.transitions if k == key and finish == "memory"]
    assert len(finished) == 1 and finished[0] in survivors - {address}  # retried on a live worker
    assert sum(1 for k, _, finish, _ in tasks.transitions if k == key and finish == "processing") >= 2
    written = [int(line.split()[0]) for line in writes.read_text().splitlines()]
    assert sorted(written) == list(range(6))  # no shard lost, none written twice
    assert_equal_stores(out, reference)


@pytest.fixture(scope="module")
def two_layer_reference(dataset, scheduler, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-layers") / "store"
    assert sf_extract(dataset, "--out", out, *SHARDED, "--layers", "1,-1", "--scheduler", scheduler).exit_code == 0
    return out


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS], ids=["chmod", "read-only remount"])
def test_a_store_turning_read_only_mid_run_reports_the_shard_write_and_keeps_only_whole_shards(
    tmp_path, dataset, scheduler, two_layer_reference, monkeypatch, capsys, error
):
    two_layers = [*SHARDED, "--layers", "1,-1", "--scheduler", scheduler]
    out = tmp_path / "store"
    disk = ReadOnlyAfter(out, writes=3, error=error)  # shard 0 whole, shard 1 has one layer of two: then read-only
    disk.install(monkeypatch)
    with pytest.raises(SystemExit) as exited:
        main(["extract", str(dataset), "--out", str(out), *two_layers])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    OUTPUTS.append(err)
    assert exited.value.code == 2 and disk.refused
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert "writing shard 1 (rows 2-3) failed" in err and os.strerror(error) in err and str(out) in err, err

    # shard 0 was written and its digests recorded, but the client could not mark it done on a read-only store
    cache, want = open_cache(out), open_cache(two_layer_reference)
    assert not cache.done_shards().any()
    assert cache.recorded_digests(0) == cache.shard_digests(0) == want.shard_digests(0)
    assert cache.recorded_digests(1) is None and not list(out.rglob("*.partial"))
    (out / ".sfcache.lock").unlink()  # could not be removed while read-only
    resumed = sf_extract(dataset, "--out", out, *two_layers)
    assert resumed.exit_code == 0, resumed.output
    assert "2 written by an earlier attempt were confirmed, not recomputed" in resumed.output, resumed.output
    assert_equal_stores(out, two_layer_reference)


def test_a_second_extractor_on_the_same_store_is_refused_and_the_first_completes(tmp_path, dataset, reference):
    out = tmp_path / "store"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    runs = [spawn_extract(dataset, out, log) for log in logs]
    try:
        codes = [run.wait(timeout=240) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                kill_process_group(run)
    assert sorted(codes) == [0, 2], [log.read_text() for log in logs]
    winner, loser = (runs[0], runs[1]) if codes[0] == 0 else (runs[1], runs[0])
    err = logs[runs.index(loser)].read_text().strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"{out / '.sfcache.lock'}: store is locked by pid {winner.pid}" in err
    assert "held open by a live process" in err
    assert_equal_stores(out, reference)


@functools.cache
def tiny_vggt():
    return load_vggt("random:tiny", "cpu")[0]


def online_targets(source, key: str) -> np.ndarray:
    """What online SF computes for an episode: preprocess -> VGGT last layer -> 16x16 pooled."""
    model = tiny_vggt()
    images = preprocess(source.read(key).frames, "sf", model.config.img_size)
    native = (images.shape[-2] // model.config.patch_size, images.shape[-1] // model.config.patch_size)
    return pool_grid(model(images, layers=(-1,))[-1], native, (16, 16)).numpy()


# Kinds of bad input not yet run end to end, at least one per source format: NaN, unequal views, empty, truncated.
BAD_INPUT = [
    (bad.libero, bad.libero_nan_actions),
    (bad.rlds, bad.rlds_empty),
    (bad.lerobot, bad.lerobot_truncated),
    (bad.robotwin, bad.robotwin_short_view),
    (bad.xpolicylab, bad.xpolicylab_nan_state),
]


@pytest.mark.parametrize("writer, case", [pytest.param(w, c, id=c.__name__) for w, c in BAD_INPUT])
def test_bad_input_end_to_end_is_one_line_or_skipped(tmp_path, scheduler, capsys, writer, case):
    written = writer(tmp_path / "data")
    damage = case(written)
    length = len(next(iter(written.episodes.values())).actions)  # one episode per shard
    out = tmp_path / "store"
    common = [
        str(written.path),
        "--out",
        str(out),
        *TINY,
        "--steps-per-shard",
        str(length),
        "--batch-size",
        "2",
        "--scheduler",
        scheduler,
    ]

    with pytest.raises(SystemExit) as exited:
        main(["extract", *common])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for named in (str(damage.file), damage.episode and f"episode {damage.episode}", damage.key, damage.expected):
        assert named is None or named in err, (named, err)

    result = sf_extract(*common, "--skip-bad")
    cache = open_cache(out)
    source = open_source(written.path, skip_bad=True)
    if damage.stage == "scan":  # left out of the store, listed as skipped
        assert result.exit_code == 0, result.output
        assert "skipped episode:" in result.output and damage.expected in result.output
        assert cache.done_shards().all() and cache.episodes == [info.key for info in source.episodes()]
        assert damage.episode is None or damage.episode not in cache.episodes
    else:  # in the store, its shard listed as failed and left not done
        assert result.exit_code == 1, result.output
        assert "failed shard" in result.output and damage.expected in result.output
        assert cache.missing_episodes() == [damage.episode]
    good = [key for key in cache.episodes if key not in cache.missing_episodes()]
    assert len(good) >= 2
    for key in good:
        want = online_targets(source, key)
        np.testing.assert_allclose(cache.read(key), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_expected_errors_survive_pickling_with_every_field():
    source_error = SourceError("/data/a.hdf5", "non-finite value at step 2", episode="t/demo_1", key="actions")
    back = pickle.loads(pickle.dumps(source_error))
    assert type(back) is SourceError and str(back) == str(source_error)
    assert (back.file, back.what, back.episode, back.key) == (
        "/data/a.hdf5",
        "non-finite value at step 2",
        "t/demo_1",
        "actions",
    )
    mismatch = ConfigMismatch("/stores/s", {"targets.dtype": ("float16", "int8")})
    back = pickle.loads(pickle.dumps(mismatch))
    assert type(back) is ConfigMismatch and str(back) == str(mismatch)
    assert back.store == "/stores/s" and back.differences == {"targets.dtype": ("float16", "int8")}
    resumed = ResumeMismatch("runs/sf", {"--model-size": ("tiny", "small")}, fix="start over")
    back = pickle.loads(pickle.dumps(resumed.with_fix("use --no-resume")))
    assert type(back) is ResumeMismatch and back.fix == "use --no-resume" and back.holder == "checkpoint"
    assert str(back) == "the checkpoint in runs/sf was trained with --model-size tiny, you asked small; use --no-resume"


def test_a_source_with_skipped_episodes_travels_to_workers_intact(tmp_path):
    written = bad.robotwin(tmp_path)
    damage = bad.robotwin_missing_camera(written)
    source = open_source(written.path, skip_bad=True)
    kept = source.episodes()
    shipped = pickle.loads(pickle.dumps(source))
    assert shipped.episodes() == kept and len(kept) == 2
    assert [str(e) for e in shipped.skipped] == [str(e) for e in source.skipped]
    assert shipped.skipped[0].episode == damage.episode and shipped.skipped[0].key == damage.key


def test_a_crash_inside_a_training_step_leaves_the_store_unchanged(tmp_path, monkeypatch):
    from sfcache.train import loop

    source = write_dataset(tmp_path / "data", demos=2, steps=6)
    store = write_store(tmp_path / "store", source)
    before = tree_digest(store)
    original = loop.compute_losses
    calls = {"n": 0}

    def crash_in_the_second_step(*args, **kwargs):
        calls["n"] += 1
        losses = original(*args, **kwargs)  # targets were read from the store for this batch
        if calls["n"] == 2:
            raise RuntimeError("simulated crash inside a training step")
        return losses

    monkeypatch.setattr(loop, "compute_losses", crash_in_the_second_step)
    config = loop.TrainConfig(
        source=source,
        cache=store,
        out=tmp_path / "run",
        steps=4,
        batch_size=4,
        model_size="tiny",
        grid=4,
        loader_workers=0,
        warmup_steps=1,
        save_every=1,
        val_every=10,
        log_every=1,
        val_samples=4,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.Trainer(config).run()
    assert calls["n"] == 2
    assert tree_digest(store) == before
    assert not (store / ".sfcache.lock").exists()


def test_an_unwritable_out_directory_is_a_one_line_error(tmp_path, dataset, monkeypatch, capsys):
    out = tmp_path / "store"
    ReadOnlyAfter(out, writes=0).install(monkeypatch)
    with pytest.raises(SystemExit) as exited:
        main(["extract", str(dataset), "--out", str(out), *SHARDED])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"{out / '.sfcache.lock'}: cannot create the store lock (Permission denied)" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- a real cluster: fencing, scheduler loss

DASK = Path(sys.executable).parent / "dask"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ExternalCluster:
    """A separately started `dask scheduler` and `dask worker` (1 thread) on loopback, as a user runs them;
    the worker preloads LoggedSlowWrites (SFCACHE_TEST_WRITE_LOG / _DELAY)."""

    def __init__(self, tmp: Path, delay: float, wrap: list[str] | None = None, lease: bool = True):
        self.tmp, self.delay, self.wrap, self.lease = tmp, delay, wrap or [], lease
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.writes = tmp / "writes.log"
        self.processes: list[subprocess.Popen] = []

    def _spawn(self, command: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        with (self.tmp / log).open("ab") as out:
            process = subprocess.Popen(
                command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.processes.append(process)
        return process

    def start_scheduler(self) -> subprocess.Popen:
        self.scheduler = self._spawn(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"], "scheduler.log"
        )
        return self.scheduler

    def start_worker(self) -> subprocess.Popen:
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            SFCACHE_TEST_WRITE_LOG=str(self.writes),
            SFCACHE_TEST_WRITE_DELAY=str(self.delay),
            **({} if self.lease else {"SFCACHE_TEST_NO_LEASE": "1"}),
        )
        return self._spawn(
            [
                *self.wrap,
                str(DASK),
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-dashboard",
                "--memory-limit",
                "0",
                "--preload",
                "tests._faults_helpers",
            ],
            "worker.log",
            env,
        )

    def wait_for_worker(self) -> None:
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)

    def __enter__(self) -> ExternalCluster:
        self.start_scheduler()
        self.start_worker()
        self.wait_for_worker()
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def spawn_client(dataset: Path, out: Path, log: Path, *args: str) -> subprocess.Popen:
    """`sf extract` as a client of a running scheduler, in its own process group (the cluster is not its child)."""
    command = sf_command("extract", dataset, "--out", out, *SHARDED, *args)
    OUTPUTS.append(log)
    with log.open("wb") as stderr:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def wait_until(condition, process: subprocess.Popen | None, log: Path | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, log.read_text() if log else "the process ended"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_orphaned_tasks_of_a_killed_client_cannot_write_into_the_store_that_replaced_it(tmp_path, dataset, scheduler):
    """kill -9 of the client while the cluster lives on, then `--overwrite` with other weights: the dead run's
    running task is fenced out (its writes refused), and the new store holds the new weights' values only."""
    seed1 = tmp_path / "seed1"
    assert (
        sf_extract(dataset, "--out", seed1, *SHARDED, "--vggt", "random:tiny@1", "--scheduler", scheduler).exit_code
        == 0
    )
    out, log = tmp_path / "store", tmp_path / "client.log"
    with ExternalCluster(tmp_path, delay=1.0, lease=False) as cluster:  # the fence alone (the lease would stop it)
        victim = spawn_client(dataset, out, log, "--scheduler", cluster.address)
        wait_until(lambda: done_count(out) >= 1, victim, log)
        os.killpg(victim.pid, signal.SIGKILL)  # the client only: its task goes on writing
        victim.wait()
        replaced = sf_extract(
            dataset, "--out", out, *SHARDED, "--vggt", "random:tiny@1", "--overwrite", "--scheduler", cluster.address
        )
        assert replaced.exit_code == 0, replaced.output
        refused = [line for line in cluster.writes.read_text().splitlines() if line.startswith("refused")]
    assert refused, cluster.writes.read_text()  # the orphan did try to write, after the new run began
    assert_equal_stores(out, seed1)


def test_a_task_of_a_finished_run_cannot_write_a_shard_or_a_done_flag(tmp_path, dataset, scheduler, reference):
    out = tmp_path / "store"
    config = ExtractConfig(
        source=dataset, out=out, vggt="random:tiny", steps_per_shard=2, batch_size=2, scheduler=scheduler
    )
    summary = extract(config, progress=False)
    cache = open_cache(out, mode="r+")
    cache.mark_not_done([1])  # a shard a partitioned worker might still own
    with pytest.raises(RunSuperseded, match=f"extraction run {summary.run[:12]}.*no run .it ended."):
        cache.write_shard(1, {3: np.zeros((2, 2, 256, 64), np.float32)}, run=summary.run)
    assert open_cache(out).done_shards().tolist() == [True, False, True, True, True, True]
    assert sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler).exit_code == 0
    assert_equal_stores(out, reference)


def test_a_live_extractor_in_another_pid_namespace_keeps_the_lock(tmp_path, dataset, capsys):
    """Same host name, pids that mean nothing here: a pid check cannot judge it; its flock says it is alive."""
    store = tmp_path / "store"
    holder_code = (
        "import sys, time; from sfcache.store import lock_store\n"
        "with lock_store(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"
    )
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", holder_code, str(store)]
    try:
        holder = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as error:
        pytest.skip(f"unshare unavailable: {error}")
    inner = []
    try:
        if holder.stdout.readline().strip() != "locked":
            pytest.skip("unshare --pid needs root here")
        recorded = json.loads((store / ".sfcache.lock").read_text())
        inner = [
            p for p in psutil.Process(holder.pid).children(recursive=True) if "lock_store" in " ".join(p.cmdline())
        ]
        assert recorded["host"] == socket.gethostname() and recorded["pid"] != inner[0].pid  # its pid is not ours
        with pytest.raises(StoreError, match=f"store is locked by pid {recorded['pid']} on host"):
            with lock_store(store):
                pass
        with pytest.raises(SystemExit) as exited:
            main(["extract", str(dataset), "--out", str(store), *TINY])
        err = capsys.readouterr().err.strip()
        assert exited.value.code == 2 and "\n" not in err and "held open by a live process" in err, err
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        psutil.wait_procs(inner, timeout=10)
    with lock_store(store):  # released by the kernel when it died
        pass


# ----------------------------------------------------------------------------- never done what the client cannot read


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.strip()
    OUTPUTS.append(err)
    assert exited.value.code == code and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_worker_that_cannot_see_the_store_is_refused_at_start_up(tmp_path, dataset, capsys):
    """The worker runs in its own mount namespace with a private tmpfs over the store's folder (like a job's
    private /tmp): it would write where the client cannot read."""
    shared = tmp_path / "shared"
    shared.mkdir()
    private = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(shared)]
    if subprocess.run([*private, "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --mount needs root here")
    out = shared / "store"
    with ExternalCluster(tmp_path, delay=0, wrap=private) as cluster:
        err = one_line_error(
            capsys, ["extract", str(dataset), "--out", str(out), *SHARDED, "--scheduler", cluster.address]
        )
    assert f"{out.resolve()}: the Dask worker tcp://127.0.0.1:" in err and f"on host {socket.gethostname()}" in err
    assert "does not see this store" in err and "shared by this client and every worker" in err
    assert not (out / "done").exists() and not (out / ".sfcache.lock").exists()


def test_a_shard_the_client_cannot_read_back_is_an_error_naming_the_worker_and_is_redone(
    tmp_path, dataset, scheduler, reference, monkeypatch, capsys
):
    from sfcache.extract import VGGTWorker

    original = VGGTWorker._write

    def write_then_vanish(cache, shard, outputs, run):  # the worker saw its file; the client will not
        written = original(cache, shard, outputs, run)
        if shard == 2:
            cache.shard_file("targets/layer_3", shard).unlink()
        return written

    monkeypatch.setattr(VGGTWorker, "_write", staticmethod(write_then_vanish))
    out = tmp_path / "store"
    err = one_line_error(capsys, ["extract", str(dataset), "--out", str(out), *SHARDED, "--scheduler", scheduler])
    monkeypatch.undo()
    shard_file = "targets/layer_3/c/2/0/0/0"
    assert (
        f"{out / shard_file}: shard 2 was written by the Dask worker on host {socket.gethostname()} at "
        f"{out.resolve() / shard_file}, but this client finds it missing; 1 shard(s) left not done" in err
    )
    assert open_cache(out).done_shards().tolist() == [True, True, False, True, True, True]
    resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert resumed.exit_code == 0 and "10 were already done" in resumed.output, resumed.output
    assert_equal_stores(out, reference)


def test_reads_of_a_done_shard_without_its_file_fail_and_sf_extract_redoes_it(tmp_path, dataset, scheduler, reference):
    from sfcache.torch import CachedTargets

    out = tmp_path / "store"
    shutil.copytree(reference, out)
    lost = out / "targets/layer_3/c/1/0/0/0"
    lost.unlink()
    key = open_cache(out).episodes[0]
    with pytest.raises(StoreError, match=f"{lost}: shard 1 is marked done but this file is missing"):
        open_cache(out).read(key)
    with pytest.raises(StoreError, match="shard 1 is marked done but this file is missing"):
        CachedTargets(out)[2]
    check = CliRunner().invoke(app, ["inspect-cache", str(out), "--check"])
    assert check.exit_code == 1 and "sf extract" in check.output and "--repair" in check.output, check.output
    resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert resumed.exit_code == 0, resumed.output
    assert f"redid shard 1: {lost} is missing" in resumed.output and "extracted 2 steps" in resumed.output
    assert_equal_stores(out, reference)


def test_sf_extract_repair_redoes_a_damaged_shard_that_check_finds(tmp_path, dataset, scheduler, reference):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    damaged = out / "targets/layer_3/c/2/0/0/0"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated: the shard index is gone
    with pytest.raises(StoreError, match=f"{damaged}: reading targets/layer_3 shard.s. .2. failed"):
        open_cache(out).read_rows([4])
    assert CliRunner().invoke(app, ["inspect-cache", str(out), "--check"]).exit_code == 1
    plain = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert plain.exit_code == 0 and "is already complete" in plain.output  # a plain resume reads nothing back
    repaired = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler, "--repair")
    assert repaired.exit_code == 0 and "redid shard 2:" in repaired.output, repaired.output
    assert_equal_stores(out, reference)


# ----------------------------------------------------------------------------- scheduler loss, no workers, signals


def test_scheduler_killed_mid_run_is_one_line_and_the_same_command_resumes_equal(tmp_path, dataset, reference):
    out, log = tmp_path / "store", tmp_path / "client.log"
    with ExternalCluster(tmp_path, delay=0.3) as cluster:
        client = spawn_client(dataset, out, log, "--scheduler", cluster.address)
        wait_until(lambda: done_count(out) >= 1, client, log)
        os.killpg(cluster.scheduler.pid, signal.SIGKILL)
        lost = time.monotonic()
        assert client.wait(timeout=60) == 2
        assert time.monotonic() - lost < 30
        err = log.read_text().strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        assert f"lost the Dask scheduler {cluster.address}" in err and "run the same command to resume" in err
        assert not is_locked(out) and done_count(out) < 6
        cluster.start_scheduler()  # the same address; its workers exited with it: start one
        cluster.start_worker()
        cluster.wait_for_worker()
        resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", cluster.address)
    assert resumed.exit_code == 0, resumed.output
    assert_equal_stores(out, reference)


def test_a_scheduler_without_workers_is_one_line_naming_it(tmp_path, dataset, monkeypatch, capsys):
    import sfcache.extract.cluster as extract_cluster

    monkeypatch.setattr(extract_cluster, "WORKER_WAIT_S", 1)
    with LocalCluster(n_workers=0, processes=False, **QUIET) as empty:
        started = time.monotonic()
        err = one_line_error(
            capsys,
            [
                "extract",
                str(dataset),
                "--out",
                str(tmp_path / "store"),
                *SHARDED,
                "--scheduler",
                empty.scheduler_address,
            ],
        )
    assert time.monotonic() - started < 20
    assert f"the Dask scheduler {empty.scheduler_address} has no workers after 1 s" in err
    assert f"`dask worker {empty.scheduler_address}`" in err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_process_group_ends_within_seconds_in_one_line_and_a_rerun_resumes(
    tmp_path, dataset, scheduler, reference, signum
):
    out, log = tmp_path / "store", tmp_path / "victim.log"
    victim = spawn_extract(dataset, out, log)
    try:
        wait_until(lambda: done_count(out) >= 1, victim, log)
        os.killpg(victim.pid, signum)  # what Ctrl-C in a terminal (or `kill -TERM -PGID`) does
        sent = time.monotonic()
        code = victim.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        kill_process_group(victim)
    err = log.read_text().strip()
    assert code == 128 + signum and took < 20, (code, took, err)
    assert err == (
        f"error: interrupted by {signal.Signals(signum).name}; work finished so far is kept: run the "
        "same command again to resume"
    ), err
    assert not is_locked(out) and not (out / ".sfcache.lock").exists()
    resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert resumed.exit_code == 0, resumed.output
    assert_equal_stores(out, reference)


# ----------------------------------------------------------------------------- damaged zarr.json


def damage_attrs(change):
    def apply(meta: Path) -> None:
        document = json.loads(meta.read_text())
        change(document["attributes"]["sfcache"])
        meta.write_text(json.dumps(document))

    return apply


ZARR_JSON_DAMAGE = {
    "layers of the wrong type": (damage_attrs(lambda a: a["targets"].update(layers="3")), "targets.layers"),
    "grid of one number": (damage_attrs(lambda a: a["targets"].update(grid=[16])), "targets.grid"),
    "num_steps a string": (damage_attrs(lambda a: a.update(num_steps="12")), "num_steps"),
    "an episode longer than the array": (damage_attrs(lambda a: a["episodes"][-1].__setitem__(3, 400)), "episodes"),
    "an episode of the wrong shape": (damage_attrs(lambda a: a["episodes"].__setitem__(0, ["k", 0])), "episodes[0]"),
    "corrupt JSON": (lambda meta: meta.write_text(meta.read_text()[:-7]), "unreadable Zarr metadata"),
}


@pytest.mark.parametrize("damage", list(ZARR_JSON_DAMAGE))
def test_a_damaged_zarr_json_is_one_line_naming_the_key_in_every_reader(
    tmp_path, reference, dataset, scheduler, capsys, damage
):
    from sfcache.torch import CachedTargets

    change, named = ZARR_JSON_DAMAGE[damage]
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    change(out / "zarr.json")
    for argv in (["inspect-cache", str(out)], ["inspect-cache", str(out), "--json"]):
        err = one_line_error(capsys, argv)
        assert str(out / "zarr.json") in err and named in err, err
    with pytest.raises(SystemExit) as exited:
        main(["inspect-cache", str(out), "--check"])
    captured = capsys.readouterr()
    assert exited.value.code in (1, 2) and "Traceback" not in captured.out + captured.err
    for read in (lambda: open_cache(out).read(open_cache(out).episodes[-1]), lambda: CachedTargets(out)[0]):
        with pytest.raises(StoreError, match=named.replace("[", r"\[").replace("]", r"\]")):
            read()
    overwrite = ["extract", str(dataset), "--out", str(out), *SHARDED, "--overwrite", "--scheduler", scheduler]
    if damage == "corrupt JSON":  # cannot be told from someone else's data: the message says to delete it
        err = one_line_error(capsys, overwrite)
        assert f"{out / 'zarr.json'}: unreadable Zarr metadata" in err and f"delete {out}" in err, err
    else:  # recognisably ours: --overwrite replaces it
        assert sf_extract(*overwrite[1:]).exit_code == 0
        assert_equal_stores(out, reference)


# ----------------------------------------------------------------------------- misleading messages


def test_inspect_cache_refuses_a_bad_threshold_and_an_unwritable_pca_path_in_one_line(tmp_path, reference, capsys):
    err = one_line_error(capsys, ["inspect-cache", str(reference), "--verify", "1", "--threshold", "2"])
    assert "--threshold must be a cosine in (0, 1], got 2.0" in err
    err = one_line_error(capsys, ["inspect-cache", str(reference), "--pca", str(tmp_path)])
    assert f"--pca {tmp_path}: is a directory" in err
    (tmp_path / "file").write_text("")
    err = one_line_error(capsys, ["inspect-cache", str(reference), "--pca", str(tmp_path / "file" / "x.png")])
    assert f"--pca {tmp_path / 'file' / 'x.png'}: cannot write the picture (" in err


def test_every_episode_bad_with_skip_bad_says_so(tmp_path, capsys):
    written = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=4, size=16)
    first = bad.libero_demo(
        written, lambda d: d.__delitem__("actions"), key="actions", expected="missing", demo="demo_0"
    )
    bad.libero_actions_shape(written)  # demo_1
    argv = ["extract", str(written.path), "--out", str(tmp_path / "store"), *TINY, "--skip-bad"]
    err = one_line_error(capsys, argv)
    assert "every episode is bad: all 2 were skipped by --skip-bad, the first because" in err
    assert first.key in err and "missing" in err


def test_long_work_off_a_terminal_prints_a_progress_line_regularly(monkeypatch):
    import io

    from rich.console import Console

    import sfcache.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    log = io.StringIO()
    with progress.progress_bar("steps", console=Console(file=log)) as bar:
        task = bar.add_task("extract", total=10)
        bar.advance(task, 3)
        time.sleep(0.3)
    lines = log.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("extract: 3/10 steps, ") for line in lines), lines


def test_losing_the_scheduler_while_checking_the_store_is_shared_is_one_error(tmp_path):
    """The shared-store check runs before any task: a connection lost there is the lost-scheduler error too."""
    from types import SimpleNamespace

    from distributed.comm import CommClosedError

    from sfcache.errors import SfcacheError
    from sfcache.extract.cluster import check_shared_store

    class GoneClient:
        def run(self, *args, **kwargs):
            raise CommClosedError("in <TCP (closed)>: Stream is closed")

    cluster = SimpleNamespace(client=GoneClient(), address="tcp://10.1.2.3:8786")
    with pytest.raises(SfcacheError, match=r"lost the Dask scheduler tcp://10\.1\.2\.3:8786"):
        check_shared_store(cluster, SimpleNamespace(store=tmp_path, run="run-1"))


# ----------------------------------------------------------------------------- integrity by default: digests per shard


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_flipped_byte_and_a_shard_copied_to_another_position_are_found_by_check_and_redone_by_repair(
    tmp_path, dataset, scheduler, reference
):
    """A default store (no --checksum): each shard's files were digested when written, bound to the shard index."""
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    assert open_cache(out).provenance.targets.checksum == "none"
    flipped, copied = out / "targets/layer_3/c/2/0/0/0", out / "targets/layer_3/c/4/0/0/0"
    flip_byte(flipped, 1000)  # inside the values: it still decodes to finite numbers
    shutil.copyfile(out / "targets/layer_3/c/1/0/0/0", copied)  # a valid shard, at the wrong position
    changed = open_cache(out).read_rows([4, 8])  # a plain read cannot tell
    assert np.isfinite(changed).all()
    assert (changed != open_cache(reference).read_rows([4, 8])).any()

    check = CliRunner().invoke(app, ["inspect-cache", str(out), "--check"])
    OUTPUTS.append(check.output)
    assert check.exit_code == 1, check.output
    flat = " ".join(check.output.split())
    for shard in (2, 4):
        assert f"shard {shard} does not match the digest recorded when it was written" in flat, check.output
    assert "another shard's file was moved or copied here" in flat and "--repair" in flat
    with pytest.raises(StoreError, match="shard 4 does not match the digest recorded"):
        open_cache(out, verify=True).read_rows([8])  # reads check when asked
    checked = open_cache(out, verify=True)
    np.testing.assert_array_equal(checked.read_rows([0, 2]), open_cache(reference).read_rows([0, 2]))

    repaired = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler, "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "redid shard 2:" in repaired.output and "redid shard 4:" in repaired.output, repaired.output
    assert "extracted 4 steps" in repaired.output
    assert_equal_stores(out, reference)


def test_a_store_written_before_digests_still_checks_and_says_it_has_none(tmp_path, dataset, scheduler, reference):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "digests")  # as every store written before digests were recorded
    check = CliRunner().invoke(app, ["inspect-cache", str(out), "--check"])
    assert check.exit_code == 0 and "no digests recorded" in " ".join(check.output.split()), check.output
    cache = open_cache(out, mode="r+")
    cache.mark_not_done([5])
    resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert resumed.exit_code == 0 and "extracted 2 steps" in resumed.output, resumed.output
    cache = open_cache(out)
    assert cache.has_digests and cache.recorded_digests(5) == cache.shard_digests(5)
    assert [cache.recorded_digests(s) for s in range(5)] == [None] * 5
    check = CliRunner().invoke(app, ["inspect-cache", str(out), "--check"])
    flat = " ".join(check.output.split())
    assert check.exit_code == 0 and "no digests recorded for done shard(s) 0-4" in flat, check.output
    assert_equal_stores(out, reference)


# ----------------------------------------------------------------------------- errors inside tasks: one line, a log


@pytest.mark.parametrize(
    "raised, expected",
    [
        (ValueError("the pooled grid is inconsistent"), "ValueError: the pooled grid is inconsistent"),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            "out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB); lower "
            "--batch-size (now 2)",
        ),
    ],
    ids=["ValueError", "out of memory"],
)
def test_an_unexpected_error_inside_a_task_is_one_line_naming_the_shard_with_its_traceback_in_a_log(
    tmp_path, dataset, scheduler, monkeypatch, capsys, raised, expected
):
    import sfcache.extract.worker as extract_worker

    original = extract_worker.pooled_targets
    calls = {"n": 0}

    def fails_on_the_fourth_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # shards hold one batch each: shard 3 (rows 6-7)
            raise raised
        return original(*args, **kwargs)

    monkeypatch.setattr(extract_worker, "pooled_targets", fails_on_the_fourth_batch)
    out = tmp_path / "store"
    argv = ["extract", str(dataset), "--out", str(out), *SHARDED, "--scheduler", scheduler]
    err = one_line_error(capsys, argv)
    monkeypatch.undo()
    log = out / ".sfcache.errors.log"
    key = open_cache(out).index.locate(6)[0]
    assert f"shard 3 (rows 6-7: episode {key} steps 2-3) failed on {socket.gethostname()}: {expected}" in err, err
    assert f"full traceback in {log}" in err and "run the same command again" in err
    trace = log.read_text()
    assert "Traceback (most recent call last)" in trace and "fails_on_the_fourth_batch" in trace
    assert open_cache(out).done_shards().tolist() == [True, True, True, False, False, False]
    resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", scheduler)
    assert resumed.exit_code == 0 and "6 were already done" in resumed.output, resumed.output


def test_absurd_shard_and_grid_sizes_are_refused_before_anything_runs(tmp_path, dataset, capsys):
    out = tmp_path / "store"
    huge = str(2**63 - 1)
    err = one_line_error(capsys, ["extract", str(dataset), "--out", str(out), *TINY, "--steps-per-shard", huge])
    assert f"--steps-per-shard must be <= 1048576, got {2**63 - 1}" in err
    err = one_line_error(capsys, ["extract", str(dataset), "--out", str(out), *TINY, "--grid", "100000x100000"])
    assert "--grid 100000x100000: each side must be in [1, 1024]" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- signals during start-up


def descendants_tagged(tag: str) -> list[psutil.Process]:
    """Every live process started with SFCACHE_TEST_TAG=tag in its environment (children outlive their parent)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SFCACHE_TEST_TAG") == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def torch_loaded(pid: int) -> bool:
    """The client has imported torch: `sf` installs its interrupt handlers before it imports any command."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


STARTUP_POINTS = {  # what must have happened before the signal: deterministic points of start-up
    "importing": lambda process, out: torch_loaded(process.pid),
    "store locked": lambda process, out: (out / ".sfcache.lock").exists(),
    "cluster starting": lambda process, out: bool(psutil.Process(process.pid).children()),
}


@pytest.mark.parametrize(
    "point, signum",
    [
        ("importing", signal.SIGTERM),
        ("store locked", signal.SIGINT),
        ("cluster starting", signal.SIGINT),
    ],
)
def test_a_signal_at_any_point_of_start_up_is_one_line_releases_the_lock_and_leaves_nothing_running(
    tmp_path, dataset, point, signum
):
    out, log, tag = tmp_path / "store", tmp_path / "victim.log", f"{tmp_path.name}-{point}"
    command = sf_command("extract", dataset, "--out", out, *SHARDED, "--workers", "1")
    OUTPUTS.append(log)
    with log.open("wb") as stderr:
        victim = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            env={**os.environ, "SFCACHE_TEST_TAG": tag},
        )
    try:
        wait_until(lambda: STARTUP_POINTS[point](victim, out), victim, log)
        os.killpg(victim.pid, signum)  # the whole process group, as a terminal's Ctrl-C
        code = victim.wait(timeout=120)
    finally:
        kill_process_group(victim)
    err = log.read_text().strip()
    assert code == 128 + signum, (code, err)
    assert err == (
        f"error: interrupted by {signal.Signals(signum).name}; work finished so far is kept: run the "
        "same command again to resume"
    ), err
    assert not is_locked(out) and not (out / ".sfcache.lock").exists()
    _, alive = psutil.wait_procs(descendants_tagged(tag), timeout=30)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


# ----------------------------------------------------------------------------- a dead client leaves no model


def test_a_killed_client_leaves_no_plugin_or_model_on_an_external_worker(tmp_path, dataset):
    out, log = tmp_path / "store", tmp_path / "client.log"
    with ExternalCluster(tmp_path, delay=0.5) as cluster, Client(cluster.address, timeout="30s") as observer:
        victim = spawn_client(dataset, out, log, "--scheduler", cluster.address)
        wait_until(lambda: done_count(out) >= 1, victim, log)
        (plugins, models), *_ = observer.run(sfcache_plugins).values()
        assert len(plugins) == 1 and models == 1  # the client's model is loaded: now it dies
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()

        def released() -> bool:
            on_workers = list(observer.run(sfcache_plugins).values())
            on_scheduler = observer.run_on_scheduler(
                lambda dask_scheduler: [n for n in dask_scheduler.worker_plugins if n.startswith("sfcache-vggt-")]
            )
            return on_workers == [([], 0)] and not on_scheduler

        wait_until(released, None, timeout=60)
        resumed = sf_extract(dataset, "--out", out, *SHARDED, "--scheduler", cluster.address)
        assert resumed.exit_code == 0, resumed.output
        assert list(observer.run(sfcache_plugins).values()) == [([], 0)]


# ----------------------------------------------------------------------------- stopping, non-stores, paths


def test_stopping_tasks_does_not_wait_when_no_worker_is_left(tmp_path):
    from sfcache.extract.control import STOP_NAME, stop_tasks

    with LocalCluster(n_workers=0, processes=False, **QUIET) as empty, Client(empty) as client:
        future = client.submit(sum, [1, 2], key="sfcache-shards-0-0-test")
        started = time.monotonic()
        stop_tasks(tmp_path, client, [future], 600)
        assert time.monotonic() - started < 60  # not the 600 s a task would get to finish its shard
    assert not (tmp_path / STOP_NAME).exists()


def foreign_group(path: Path) -> None:
    zarr.create_group(store=str(path), zarr_format=3, attributes={"thesis": "chapter 3"})


NOT_STORES = {
    "missing path": (lambda path: None, "does not exist"),
    "a file": (lambda path: path.write_text("x"), "is a file"),
    "an empty folder": (lambda path: path.mkdir(), "no zarr.json here"),
    "garbage zarr.json": (lambda path: (path.mkdir(), (path / "zarr.json").write_text("{[nonsense")), "unreadable"),
    "empty zarr.json": (lambda path: (path.mkdir(), (path / "zarr.json").write_text("")), "unreadable"),
    "a foreign zarr group": (foreign_group, "holds no sfcache provenance"),
}


@pytest.mark.parametrize("case", list(NOT_STORES))
def test_inspect_cache_on_something_that_is_not_a_store_is_one_line(tmp_path, capsys, case):
    make, why = NOT_STORES[case]
    path = tmp_path / "thing"
    make(path)
    for extra in ([], ["--check"], ["--check", "--json"]):
        err = one_line_error(capsys, ["inspect-cache", str(path), *extra])
        assert err.startswith(f"error: not an sfcache store: {path}") and why in err, err
        assert "--repair" not in err


def test_check_failures_keep_square_brackets_and_empty_paths_are_errors(tmp_path, reference, capsys):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    damage_attrs(lambda a: a["episodes"].__setitem__(0, ["k", 0]))(out / "zarr.json")
    check = CliRunner().invoke(app, ["inspect-cache", str(out), "--check"], env={"COLUMNS": "400"})
    assert check.exit_code == 1 and "expected [key, instruction, start, length]" in check.output, check.output
    assert "--repair" not in check.output  # a damaged provenance is not what --repair redoes
    for argv, named in (
        (["extract", "", "--out", str(tmp_path / "s"), *TINY], "PATH: empty path"),
        (["extract", str(tmp_path), "--out", "", *TINY], "--out: empty path"),
        (["inspect-cache", ""], "STORE: empty path"),
        (["inspect-source", " "], "PATH: empty path"),
    ):
        assert named in one_line_error(capsys, argv)


def test_no_fault_test_output_holds_a_traceback():
    """Runs last: what every fault test above showed the user (CLI output, client logs) has no traceback."""
    if not OUTPUTS:
        pytest.skip("scans the outputs of the other tests in this module; run them together")
    texts = [
        item.read_text(errors="replace") if isinstance(item, Path) else item
        for item in OUTPUTS
        if not isinstance(item, Path) or item.exists()
    ]
    offending = [text for text in texts if "Traceback" in text]
    assert not offending, offending[0]
