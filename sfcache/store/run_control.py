"""Who may write a store: the extractor's lock, then the run fence that shuts out tasks of any earlier run."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sfcache.errors import Message, RunSuperseded, StoreError, extraction_field, interrupts_deferred

__all__ = ["LOCK_NAME", "RUN_NAME", "current_run", "is_locked", "lock_store", "run_fence", "store_run"]

LOCK_NAME = ".sfcache.lock"
RUN_NAME = ".sfcache.run"  # the id of the one extraction run allowed to write (see store_run)
RUN_ENDED = "ended"
OUT = extraction_field("out")  # the store's folder, as messages tell a user to change it


@contextmanager
def lock_store(path: str | Path) -> Iterator[Path]:
    """Hold STORE/.sfcache.lock for the duration: an flock on the open file, not a pid in it.

    The kernel drops the flock when its holder dies (kill -9 included), so a leftover, empty or garbage
    lock file never blocks a later run, and a live holder that this process cannot see (another PID
    namespace or container on the same host, another host on NFS) is never judged dead.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(Message(f"{path}: is a file; a store is a directory (choose another ", OUT, ")"))
    created = not path.exists()
    lock = path / LOCK_NAME
    with ExitStack() as critical:
        critical.enter_context(interrupts_deferred())  # no signal between taking the lock and the try releasing it
        try:
            path.mkdir(parents=True, exist_ok=True)
            descriptor = _hold_lock_file(lock)
        except OSError as err:
            raise StoreError(
                Message(
                    f"{lock}: cannot create the store lock ({err.strerror}); ",
                    OUT,
                    " must be a writable directory on a file system with file locks",
                )
            ) from None
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(mine).encode(), 0)
            os.fsync(descriptor)
        except OSError as err:
            _release_lock(descriptor, lock, path, created)
            raise StoreError(
                f"{lock}: cannot write the store lock ({err.strerror}); free space or make {path} writable, "
                "then run again"
            ) from None
        try:
            critical.close()  # a signal that arrived meanwhile is handled here, inside the try
            yield lock
        finally:
            _release_lock(descriptor, lock, path, created)


def _hold_lock_file(lock: Path) -> int:
    """An open descriptor of `lock` holding its exclusive flock; StoreError naming the holder if it is taken."""
    while True:
        descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise StoreError(_locked_message(lock)) from None
        except OSError:
            os.close(descriptor)
            raise
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            return descriptor
        os.close(descriptor)  # the holder removed the file as we opened it: lock the new one


def _locked_message(lock: Path) -> str:
    holder = _read_lock(lock)
    if isinstance(holder.get("pid"), int) and isinstance(holder.get("started"), (int, float)):
        since = datetime.fromtimestamp(holder["started"], UTC).isoformat(timespec="seconds")
        who = f"pid {holder['pid']} on host {holder.get('host')} since {since}"
    else:
        who = "a running process (its lock file names no owner)"
    return (
        f"{lock}: store is locked by {who}; another extractor is writing it (the lock is held open by a "
        "live process and is released when it ends). Wait for it, or stop it, then run again"
    )


def _release_lock(descriptor: int, lock: Path, path: Path, created: bool) -> None:
    try:
        lock.unlink(missing_ok=True)  # while still holding it, so no one locks a file about to vanish
        if created and not any(path.iterdir()):  # nothing was written: leave no empty store behind
            path.rmdir()
    except OSError:  # the store turned read-only: the file stays, but unlocked it blocks no later run
        pass
    finally:
        os.close(descriptor)


def _read_lock(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_locked(path: str | Path) -> bool:
    """True while an extractor holds the store lock (a leftover lock file of a dead one does not count)."""
    try:
        descriptor = os.open(Path(path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no file locks on this file system: nothing can be said to hold it
        return False
    finally:
        os.close(descriptor)


@contextmanager
def store_run(path: str | Path, wait: float = 60.0) -> Iterator[str]:
    """Make this extraction run the only one allowed to write the store; yields its run id.

    The id goes into STORE/.sfcache.run under an exclusive flock; every shard write holds a shared
    flock on that file and writes only while the file holds its task's run id (`StoreWriter.write_shard(run=)`).
    So once a new run has started, or this one has ended, no task of an older client (killed, or cut off
    from a cluster that lives on) can write a shard or set a done flag any more. Call inside `lock_store`.
    """
    path = Path(path)
    run = uuid.uuid4().hex
    _fence(path, run, wait)
    try:
        yield run
    finally:
        try:
            _fence(path, RUN_ENDED, wait, remove=True)
        except (OSError, StoreError):  # a read-only store, or a hung old worker: the next run fences again
            pass


def _fence(path: Path, token: str, wait: float, remove: bool = False) -> None:
    """Wait for writes in progress (shared flocks) to end, then publish `token` as the store's run."""
    marker = path / RUN_NAME
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise StoreError(
            Message(f"{marker}: cannot create the run marker ({err.strerror}); ", OUT, " must be writable")
        ) from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{marker}: a Dask worker of an earlier run is still writing a shard after "
                        f"{wait:.0f} s; stop the old workers (or wait), then run again"
                    ) from None
                time.sleep(0.05)
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, token.encode(), 0)
            os.fsync(descriptor)
            if remove:
                marker.unlink(missing_ok=True)
        except OSError as err:
            raise StoreError(
                f"{marker}: cannot write the run marker ({err.strerror}); free space or make "
                f"{path} writable, then run again"
            ) from None
    finally:
        os.close(descriptor)


def current_run(path: str | Path) -> str:
    """The run id allowed to write the store now ("" when none: never started, or ended)."""
    try:
        token = (Path(path) / RUN_NAME).read_text()
    except OSError:
        return ""
    return "" if token == RUN_ENDED else token


@contextmanager
def run_fence(path: Path, run: str, what: str) -> Iterator[None]:
    """Hold a shared flock on the run marker while writing `what`; StoreError when `run` is no longer current."""
    if not run:
        raise StoreError(f"{path}: {what} not written: a fenced write needs the extraction run's id")
    try:
        descriptor = os.open(path / RUN_NAME, os.O_RDONLY)
    except FileNotFoundError:
        descriptor = None
    except OSError as err:
        raise StoreError(f"{path / RUN_NAME}: cannot open the run marker for {what} ({err.strerror})") from None
    try:
        current = ""
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH)
                token = os.pread(descriptor, 64, 0).decode(errors="replace")
            except OSError as err:
                raise StoreError(
                    f"{path / RUN_NAME}: cannot lock or read the run marker for {what} "
                    f"({err.strerror}); the store needs a file system with file locks"
                ) from None
            current = "" if token == RUN_ENDED else token
        if current != run:
            now = f"run {current[:12]}" if current else "no run (it ended)"
            raise RunSuperseded(
                f"{path}: {what} not written: this task belongs to extraction run {run[:12]}, "
                f"but the store now belongs to {now}; the task of a dead, interrupted or finished "
                "client is fenced out"
            )
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)
