"""Run control over a store's shards: stop tasks, repair shards, confirm written ones, report task failures."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from distributed import Client, wait

from sfcache.errors import Message, SfcacheError, StoreError
from sfcache.extract.config import named
from sfcache.extract.report import TaskReport
from sfcache.store import DIGESTS_ARRAY, ERROR_LOG
from sfcache.version import __version__

STOP_NAME = ".sfcache.stop"  # created by the client to make running tasks finish their shard and return
STOP_WAIT_S = 600  # after a failure, how long running tasks may take to finish their shard
INTERRUPT_WAIT_S = 5  # ... after Ctrl-C / SIGTERM / SIGHUP (the run fence stops any later write)
STOP_SAY_S = 5  # waiting for running tasks longer than this is said on stderr


def stop_tasks(store: Path, client: Client, futures: list, timeout: float) -> None:
    """Make running tasks finish their current shard and queued ones return at once, then wait for them
    (at most `timeout` s, saying so after STOP_SAY_S, and not at all once no worker is left to run them),
    so that no task writes after the lock is released; the run fence stops any straggler from writing once
    this run has ended. Never raises: the error that stopped the run is the one to report."""
    try:
        (store / STOP_NAME).touch()
    except OSError:  # a read-only store: running tasks stop at their next failing write instead
        pass
    started = time.monotonic()
    said = False
    try:
        while any(not future.done() for future in futures) and time.monotonic() - started < timeout:
            if not client.scheduler_info(n_workers=-1)["workers"]:
                break  # nothing can run them: the fence covers whatever a worker that comes back would do
            if not said and time.monotonic() - started > STOP_SAY_S:
                busy = sum(not future.done() for future in futures)
                logging.getLogger("sfcache").warning(
                    "waiting up to %.0f s for %d running task(s) to finish their current shard ...", timeout, busy
                )
                said = True
            try:
                wait(futures, timeout=1)
            except TimeoutError:
                pass
    except BaseException:  # noqa: BLE001  a dead cluster or a second Ctrl-C: the fence covers the rest
        pass
    finally:
        for future in futures:
            try:
                future.cancel()
            except Exception:  # noqa: BLE001  the cluster is gone
                pass
        try:
            remove_stop_file(store)
        except StoreError:  # left for the next run's start-up, which removes it or says why it cannot
            pass


def remove_stop_file(store: Path) -> None:
    """Remove the stop request; checked first, since a read-only file system refuses even an absent file's unlink."""
    stop = store / STOP_NAME
    try:
        if stop.exists():
            stop.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StoreError(
            Message(f"{stop}: cannot remove ({err.strerror}); ", named("out"), " must be writable")
        ) from None


def repair(cache, full: bool) -> list[dict]:
    """Clear the done flags of done shards this client cannot read back, so that this run redoes them.

    Always: a shard file that is missing. With `full` (--repair): every done shard's files are also compared with
    the digests recorded when they were written (any changed byte, or another shard's file in its place), then
    decoded (checksums, when the store has them) and checked for NaN/Inf. Returns {"shard", "why"} per shard
    cleared; a `why` that names config fields is a `Message`.
    """
    broken = {shard: f"{file} is missing" for shard, file in cache.missing_shard_files().items()}
    if full:
        for shard in np.flatnonzero(cache.done_shards()).tolist():
            problem = None if shard in broken else cache.digest_problem(shard)
            if problem:
                broken[shard] = problem
            for layer in () if shard in broken else cache.layers:
                try:
                    values = cache.read_rows(cache.shard_rows(shard), layer=layer)
                except StoreError as error:
                    broken[shard] = error.message  # names the repair setting, as the command shows it
                    break
                if not np.isfinite(values).all():
                    broken[shard] = f"layer {layer} holds NaN or Inf"
                    break
    if broken:
        cache.mark_not_done(sorted(broken))
    return [{"shard": shard, "why": why} for shard, why in sorted(broken.items())]


def confirm_written(cache, report: TaskReport) -> list[tuple]:
    """Mark done the shards a task wrote whose files read back, from this client's view of the file system, with
    the digests the worker reported and recorded; the others are reset (redone by the next run) and returned as
    (shard, file, how, the task's report: where it was written) for `unconfirmed_error`."""
    good, bad = [], []
    for shard in sorted(report.written):
        ours, theirs = cache.shard_digests(shard), report.written[shard]
        if ours == theirs == cache.recorded_digests(shard):
            good.append(shard)
            continue
        file = next((f for f in theirs if ours.get(f) != theirs[f]), DIGESTS_ARRAY)
        how = "missing" if ours.get(file) is None else "different"
        if file == DIGESTS_ARRAY:
            how = "different from its recorded digest"
        bad.append((shard, file, how, report))
    if bad:
        cache.mark_not_done([shard for shard, *_ in bad])
    cache.mark_done(good)
    return bad


def unconfirmed_error(cache, bad: list[tuple]) -> StoreError:
    """Written shards this client could not read back: the first one named with the worker's host and path."""
    shard, file, how, where = bad[0]
    return StoreError(
        Message(
            f"{cache.path / file}: shard {shard} was written by the Dask worker on host {where.host} at "
            f"{Path(where.store) / file}, but this client finds it {how}; {len(bad)} shard(s) left not done. ",
            named("out"),
            " must be on a file system shared by this client and every worker (not a job's private /tmp); fix "
            "that and run the same command again to redo them",
        )
    )


def task_error(futures: list, report: TaskReport, store: Path) -> SfcacheError:
    """The failure of the lowest shard among the tasks finished so far (the first to fix), as one line; an
    unexpected error's traceback is written to the store's error log, which the line names."""
    first = _first_error(futures, report)
    if not first.traceback:
        return StoreError(first.error)
    log = write_error_log(store, first.traceback)
    return SfcacheError(
        Message(
            first.error,
            f"; finished shards are kept, fix the cause and run the same command again; full traceback in {log}",
        )
    )


def _first_error(futures: list, report: TaskReport) -> TaskReport:
    """The report of the lowest failed shard among the tasks finished so far (the first to fix)."""
    errors = [report]
    for future in futures:
        if future.status == "finished":
            try:
                other = future.result(timeout=1)
            except Exception:  # a failed or lost task has no report to offer
                continue
            if other.error:
                errors.append(other)
    return min(errors, key=lambda r: r.error_shard)


def write_error_log(store: Path, text: str) -> Path:
    """Append a traceback to STORE/ERROR_LOG (a temporary file when the store is not writable); its path."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for log in (store / ERROR_LOG, Path(tempfile.gettempdir()) / f"sfcache-error-{os.getpid()}.log"):
        try:
            with open(log, "a") as handle:
                handle.write(f"--- {stamp} sfcache {__version__}\n{text}\n")
            return log
        except OSError:
            continue
    return Path(tempfile.gettempdir())
