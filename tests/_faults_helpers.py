"""Fault injectors for tests/test_faults.py that must be importable inside Dask worker processes."""

from __future__ import annotations

import errno
import io
import os
import time
from pathlib import Path

from distributed import WorkerPlugin
from distributed.diagnostics.plugin import SchedulerPlugin

from sfcache.errors import RunSuperseded
from sfcache.store import StoreWriter


class LoggedSlowWrites(WorkerPlugin):
    """Make each shard write take `delay` seconds (so a task is still running when its worker is killed) and
    append "shard pid" to `log` after every completed write_shard (to count how often each shard was written),
    or "refused shard pid" when the run fence refused it."""

    def __init__(self, log: Path, delay: float):
        self.log, self.delay = str(log), delay

    def setup(self, worker=None):
        original = StoreWriter.write_shard
        log, delay = self.log, self.delay

        def write_shard(cache, shard, targets, mask=None, **kwargs):
            time.sleep(delay)
            try:
                digests = original(cache, shard, targets, mask, **kwargs)
            except RunSuperseded:
                with open(log, "a") as handle:
                    handle.write(f"refused {shard} {os.getpid()}\n")
                raise
            with open(log, "a") as handle:
                handle.write(f"{shard} {os.getpid()}\n")
            return digests

        StoreWriter.write_shard = write_shard


def dask_setup(worker):
    """`dask worker --preload tests._faults_helpers`: LoggedSlowWrites from SFCACHE_TEST_WRITE_LOG/_DELAY;
    SFCACHE_TEST_NO_LEASE=1 keeps the model of a dead client (so that only the run fence stops its tasks)."""
    if os.environ.get("SFCACHE_TEST_NO_LEASE"):
        from sfcache.extract import VGGTWorker

        VGGTWorker.client_alive = lambda self: True
    if os.environ.get("SFCACHE_TEST_WRITE_LOG"):
        LoggedSlowWrites(
            Path(os.environ["SFCACHE_TEST_WRITE_LOG"]), float(os.environ.get("SFCACHE_TEST_WRITE_DELAY", "0"))
        ).setup(worker)


def sfcache_plugins(dask_worker=None) -> tuple[list[str], int]:
    """(sfcache plugins on this worker, VGGT models alive in its memory); run through client.run."""
    import gc

    from sfcache.vggt import VGGTFeatures

    gc.collect()
    models = sum(isinstance(o, VGGTFeatures) for o in gc.get_objects())
    return [name for name in dask_worker.plugins if name.startswith("sfcache-vggt-")], models


def running_tasks(dask_worker=None) -> tuple[int, list[str]]:
    """(pid, keys of the tasks this worker is executing right now); run through client.run."""
    return os.getpid(), [str(task.key) for task in dask_worker.state.executing]


class TaskLog(SchedulerPlugin):
    """Every task state transition seen by the scheduler: (key, from, to, worker of a finished task)."""

    def __init__(self):
        self.transitions: list[tuple[str, str, str, str | None]] = []

    def transition(self, key, start, finish, *args, **kwargs):
        self.transitions.append((str(key), start, finish, kwargs.get("worker")))


class ReadOnlyAfter:
    """Simulate `chmod -R a-w STORE` for a non-root user (EACCES), or a read-only remount (EROFS), once `writes`
    shard files under STORE/targets were published.

    Tests run as root, whom chmod does not stop; so every call that would create, rename, delete or open for
    writing something inside the store raises PermissionError(EACCES) from then on, as the kernel would; with
    EROFS the kernel refuses even the unlink of an absent file. Install with `install(monkeypatch)`; reads keep working.
    """

    CALLS = ("open", "unlink", "replace", "rename", "link", "mkdir", "rmdir")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, store: Path, writes: int, error: int = errno.EACCES):
        self.store, self.writes, self.error = str(store.resolve()), writes, error
        self.published = 0
        self.refused: list[str] = []

    @property
    def read_only(self) -> bool:
        return self.published >= self.writes

    def _inside(self, path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return path == self.store or path.startswith(self.store + os.sep)

    def _refuse(self, path) -> None:
        self.refused.append(os.fspath(path))
        raise OSError(self.error, os.strerror(self.error), os.fspath(path))

    def install(self, monkeypatch) -> None:
        real = {name: getattr(os, name) for name in self.CALLS}
        real_io_open = io.open

        def guarded(name):
            def call(*args, **kwargs):
                paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
                writes = name != "open" or (len(args) > 1 and args[1] & self.WRITE_FLAGS)
                if name == "mkdir":  # the kernel answers EEXIST before EACCES
                    writes = not os.path.lexists(paths[0])
                elif name != "open" and not (name == "unlink" and self.error == errno.EROFS):
                    writes = os.path.lexists(paths[0])  # ... and ENOENT before EACCES (not before EROFS)
                if self.read_only and writes and any(self._inside(p) for p in paths):
                    self._refuse(paths[-1])
                result = real[name](*args, **kwargs)
                if (
                    name == "replace"
                    and self._inside(args[1])
                    and "/targets/" in os.fspath(args[1])
                    and "/c/" in os.fspath(args[1])
                ):  # a chunk (shard) file, not metadata:
                    self.published += 1
                return result

            return call

        def io_open(file, mode="r", *args, **kwargs):
            if self.read_only and not isinstance(file, int) and set(mode) & set("wax+") and self._inside(file):
                self._refuse(file)
            return real_io_open(file, mode, *args, **kwargs)

        for name in self.CALLS:
            monkeypatch.setattr(os, name, guarded(name))
        monkeypatch.setattr(io, "open", io_open)
