"""Two extraction tasks in flight per worker, one at a time on the model: the next task reads while this one
computes, and computes while this one's last shard is written. Its stores are byte-identical to one task at a
time, and a bad file, a superseded run and the stop file still end it right.

The worker runs in this process (an in-process cluster), so `Timeline` can record what it does, in order.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from distributed import LocalCluster

from sfcache.errors import SourceError, StoreError
from sfcache.extract import STOP_NAME, TASKS_IN_FLIGHT, ExtractConfig, VGGTWorker, extract
from sfcache.sources.synthetic import write_robotwin
from sfcache.store import RUN_NAME, open_cache
from tests._train_helpers import tree_digest
from tests.test_extract import _corrupt_robotwin_frame

TASKS = [(0, 1), (2, 3), (4, 5)]  # 6 shards of 2 steps on one worker: 3 tasks of 2 shards (see _run_shards)
HOLD_S = 60  # how long a last write waits for the next task to compute (never, if they overlap)


@pytest.fixture(scope="module")
def schedulers():
    """In-process clusters of one worker: one Dask thread (one task at a time) and TASKS_IN_FLIGHT threads."""
    common = dict(n_workers=1, processes=False, dashboard_address=":0", silence_logs=logging.CRITICAL)
    with (
        LocalCluster(threads_per_worker=1, **common) as one,
        LocalCluster(threads_per_worker=TASKS_IN_FLIGHT, **common) as overlapping,
    ):
        yield {"one": one.scheduler_address, "overlapping": overlapping.scheduler_address}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """6 legacy RoboTwin episodes of 2 steps (JPEG frames, 3 views): one episode per shard."""
    return write_robotwin(
        tmp_path_factory.mktemp("pipeline") / "data", tasks=1, episodes=6, steps=2, height=48, width=64
    ).path


def config(dataset: Path, out: Path, scheduler: str, **options) -> ExtractConfig:
    return ExtractConfig(
        source=dataset, out=out, vggt="random:tiny", steps_per_shard=2, batch_size=2, scheduler=scheduler, **options
    )


@pytest.fixture(scope="module")
def one_at_a_time(dataset, schedulers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "store"
    assert extract(config(dataset, out, schedulers["one"]), progress=False).shards_done == 6
    return out


def store_bytes(path: Path) -> dict:
    """Every file's digest and the provenance, less what differs between any two runs (time, run id)."""
    files = {
        name: digest
        for name, digest in tree_digest(path).items()
        if name != "zarr.json" and not name.startswith(".sfcache")
    }
    attrs = dict(zarr.open_group(str(path), mode="r").attrs["sfcache"])
    attrs.pop("created")
    return {"files": files, "attrs": attrs}


class Timeline:
    """What the worker does, in order: ("compute", task) per batch, ("write" | "written", task, shard) per
    shard, ("held", task, whether the next task computed meanwhile) before a task's last write.

    The last write of each of the first `holds` tasks on the model waits (at most HOLD_S) until the next
    task has computed a batch: with tasks run one at a time that never happens while the write is pending.
    `on_held(task)` runs after."""

    def __init__(self, monkeypatch, holds: int = len(TASKS) - 1, on_held=lambda task: None):
        self.events: list[tuple] = []
        self.turns: list[tuple] = []  # tasks in the order they first computed
        self.changed = threading.Condition()
        task_of = threading.local()
        run, targets, write = VGGTWorker._run, VGGTWorker._targets, VGGTWorker._write

        def recorded_run(plugin, shards):
            task_of.task = tuple(shards)
            return run(plugin, shards)

        def recorded_targets(plugin, inputs, dtype):
            with self.changed:
                if task_of.task not in self.turns:
                    self.turns.append(task_of.task)
                self.events.append(("compute", task_of.task))
                self.changed.notify_all()
            return targets(plugin, inputs, dtype)

        def recorded_write(cache, shard, outputs, run_id):
            task = next(task for task in TASKS if shard in task)
            if shard == task[-1]:
                with self.changed:
                    later = self.turns.index(task) + 1
                    if later <= holds:
                        computed = self.changed.wait_for(lambda: len(self.turns) > later, timeout=HOLD_S)
                        self.events.append(("held", task, computed))
                on_held(task)
            self.events.append(("write", task, shard))
            written = write(cache, shard, outputs, run_id)
            self.events.append(("written", task, shard))
            return written

        monkeypatch.setattr(VGGTWorker, "_run", recorded_run)
        monkeypatch.setattr(VGGTWorker, "_targets", recorded_targets)
        monkeypatch.setattr(VGGTWorker, "_write", staticmethod(recorded_write))

    def of(self, kind: str) -> list[tuple]:
        return [event[1:] for event in self.events if event[0] == kind]


def test_overlapping_tasks_take_turns_on_the_model_and_write_byte_identical_stores(
    tmp_path, dataset, schedulers, one_at_a_time, monkeypatch
):
    timeline = Timeline(monkeypatch)
    out = tmp_path / "store"
    summary = extract(config(dataset, out, schedulers["overlapping"]), progress=False)
    assert summary.shards_done == 6 and summary.failed == []
    assert store_bytes(out) == store_bytes(one_at_a_time)

    assert sorted(timeline.turns) == TASKS
    computes = [task for (task,) in timeline.of("compute")]
    assert computes == [task for task in timeline.turns for _ in task]  # one task at a time, each to its end
    # the next task computed while each task's last write waited: the model had work at every task boundary
    assert timeline.of("held") == [(task, True) for task in timeline.turns[:-1]]
    assert [shard for _, shard in timeline.of("write")] == [s for task in timeline.turns for s in task]


def test_one_task_at_a_time_never_computes_during_a_last_write(tmp_path, dataset, schedulers, monkeypatch):
    """The control for the test above: with one Dask thread the next task cannot compute during the write."""
    monkeypatch.setattr("tests.test_pipeline.HOLD_S", 0.5)
    timeline = Timeline(monkeypatch)
    extract(config(dataset, tmp_path / "store", schedulers["one"]), progress=False)
    assert timeline.of("held") == [(task, False) for task in timeline.turns[:-1]]


def test_a_bad_file_in_one_of_two_tasks_in_flight_stops_the_run_or_is_skipped(
    tmp_path, dataset, schedulers, one_at_a_time
):
    data = shutil.copytree(dataset, tmp_path / "data")  # a private copy to damage
    bad_file = _corrupt_robotwin_frame(data, episode=3, step=1)  # shard 3, second shard of task (2, 3)
    out = tmp_path / "store"
    with pytest.raises(SourceError, match="shard 3 left not done") as raised:
        extract(config(data, out, schedulers["overlapping"]), progress=False)
    assert bad_file in str(raised.value)
    done = open_cache(out).done_shards()
    assert not done[3] and not (out / STOP_NAME).exists() and not (out / ".sfcache.lock").exists()

    summary = extract(config(data, out, schedulers["overlapping"], skip_bad=True), progress=False)
    assert [failed["shard"] for failed in summary.failed] == [3]
    cache, want = open_cache(out), open_cache(one_at_a_time)
    assert cache.done_shards().tolist() == [True, True, True, False, True, True]
    for shard in (0, 1, 2, 4, 5):
        rows = cache.shard_rows(shard)
        np.testing.assert_array_equal(cache.read_rows(rows), want.read_rows(rows))


def test_a_run_superseded_while_two_tasks_are_in_flight_writes_nothing_more(
    tmp_path, dataset, schedulers, one_at_a_time, monkeypatch
):
    out = tmp_path / "store"

    def take_over(task):  # another run takes the store as the first task's last write is due
        if task == timeline.turns[0]:
            (out / RUN_NAME).write_text("f" * 32)

    timeline = Timeline(monkeypatch, holds=1, on_held=take_over)
    with pytest.raises(StoreError, match="fenced out"):
        extract(config(dataset, out, schedulers["overlapping"]), progress=False)
    monkeypatch.undo()
    first = timeline.turns[0]
    assert timeline.of("held")[0] == (first, True)  # the second task was computing by then
    assert open_cache(out).done_shards().tolist() == [shard == first[0] for shard in range(6)]
    assert not [event for event in timeline.events if event[0] == "written" and event[1] != first]
    extract(config(dataset, out, schedulers["overlapping"]), progress=False)
    assert store_bytes(out) == store_bytes(one_at_a_time)


def test_the_stop_file_stops_the_task_waiting_to_start_and_leaves_whole_shards(
    tmp_path, dataset, schedulers, one_at_a_time, monkeypatch
):
    out = tmp_path / "store"

    def stop(task):
        if task == timeline.turns[0]:
            (out / STOP_NAME).touch()

    timeline = Timeline(monkeypatch, holds=1, on_held=stop)
    summary = extract(config(dataset, out, schedulers["overlapping"]), progress=False)
    monkeypatch.undo()
    first, second = timeline.turns[:2]
    third = next(task for task in TASKS if task not in (first, second))
    done = open_cache(out).done_shards()
    assert all(done[list(first)]) and not any(done[list(third)]) and summary.shards_done == done.sum()
    assert len(timeline.turns) == 2  # the third task computed nothing
    summary = extract(config(dataset, out, schedulers["overlapping"]), progress=False)
    assert summary.shards_done == 6 and not (out / STOP_NAME).exists()
    assert store_bytes(out) == store_bytes(one_at_a_time)
