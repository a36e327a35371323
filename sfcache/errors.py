"""Errors for expected problems: the CLI prints them as one line, never a traceback."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial


class SfcacheError(Exception):
    """An expected, user-fixable problem (bad input, wrong config, missing file)."""


def raise_problems(problems: list[str]) -> None:
    """One SfcacheError listing every problem found: a config reports all of them at once, not the first."""
    if problems:
        raise SfcacheError("; ".join(problems))


class SourceError(SfcacheError):
    """A dataset file does not hold what its format promises."""

    def __init__(self, file, what: str, *, episode: str | None = None, key: str | None = None):
        self.file, self.episode, self.key, self.what = str(file), episode, key, what
        where = [self.file]
        if episode is not None:
            where.append(f"episode {episode}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {what}")

    def __reduce__(self):
        """Rebuild from the fields, so the error survives pickling (Dask workers, skipped lists)."""
        return partial(type(self), episode=self.episode, key=self.key), (self.file, self.what)


class WeightsError(SfcacheError):
    """A VGGT checkpoint cannot be found, read or matched to the architecture."""


class StoreError(SfcacheError):
    """A cache store is missing, locked, incomplete or configured differently."""


class NotAStore(StoreError):
    """The path is no sfcache store at all (missing, a file, an empty folder, unreadable or foreign zarr.json):
    there is nothing to check or repair."""


class ConfigMismatch(StoreError):
    """What is asked differs from what a store (or checkpoint: `holder`) holds; the message lists each difference
    and ends with `fix`, what to do about it (a store's: start it over with --overwrite)."""

    OVERWRITE = "use --overwrite to replace it, or another --out"

    def __init__(
        self, store, differences: dict[str, tuple[object, object]], *, fix: str = OVERWRITE, holder: str = "store"
    ):
        self.store, self.differences, self.fix, self.holder = str(store), differences, fix, holder
        lines = "; ".join(f"{k}: {holder} has {a!r}, asked {b!r}" for k, (a, b) in differences.items())
        super().__init__(f"{store}: configuration differs ({lines}); {fix}")

    def with_fix(self, fix: str) -> ConfigMismatch:
        """The same differences with another remedy (a command whose flag for starting over is not --overwrite)."""
        return type(self)(self.store, self.differences, fix=fix, holder=self.holder)

    def __reduce__(self):
        """Rebuild from the fields, so the error survives pickling (Dask workers)."""
        return partial(type(self), fix=self.fix, holder=self.holder), (self.store, self.differences)


class ResumeMismatch(ConfigMismatch):
    """A run resumed with other settings than its checkpoint was trained with: `differences` are keyed by the flag
    that sets each ({"--model-size": ("tiny", "small")}), so the message reads as the command line was typed."""

    NO_RESUME = "use --no-resume (or another --out) to start over"

    def __init__(
        self, run, differences: dict[str, tuple[object, object]], *, fix: str = NO_RESUME, holder: str = "checkpoint"
    ):
        self.store, self.differences, self.fix, self.holder = str(run), differences, fix, holder
        pairs = ", and ".join(f"{flag} {_plain(a)}, you asked {_plain(b)}" for flag, (a, b) in differences.items())
        StoreError.__init__(self, f"the {holder} in {run} was trained with {pairs}; {fix}")


def _plain(value: object) -> str:
    """A recorded setting as a user types it: 'tiny', 'a,b' for a list, 'none' for None."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_plain, value))
    return str(value)


def differences(recorded: Mapping, asked: Mapping, fields: Iterable[str]) -> dict[str, tuple[object, object]]:
    """{field: (recorded, asked)} for each of `fields` whose values differ, in the order given: what
    `ConfigMismatch` takes. A dotted field ("vggt.weights_id") looks inside nested dicts; absent is None."""

    def at(node, dotted: str):
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    pairs = ((field, at(recorded, field), at(asked, field)) for field in fields)
    return {field: (old, new) for field, old, new in pairs if old != new}


class RunSuperseded(StoreError):
    """A task of an extraction run that is no longer the store's current run tried to write: it is fenced out."""


class Interrupted(SfcacheError):
    """SIGINT, SIGTERM or SIGHUP arrived; finished work is kept (the CLI exits 128 + signal)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; work finished so far is kept: "
            "run the same command again to resume"
        )


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def signals_handled(signums: Iterable[int], handler) -> Iterator[None]:
    """Handle `signums` with `handler` (a function or signal.SIG_IGN) in the main thread, then restore the previous
    handlers; a no-op in other threads, where Python cannot install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for a critical section (taking a lock and entering the `try` that
    releases it, starting worker processes): the first that arrives meanwhile is noted, then raised again when the
    section ends, where the handlers from before it act on it (`interrupts_raise`: `Interrupted`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    with signals_handled(INTERRUPTS, lambda signum, frame: arrived.append(signum)):
        yield
    if arrived:
        signal.raise_signal(arrived[0])


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP (Ctrl-C, `kill`, a closed SSH terminal) into `Interrupted` in the main
    thread, so long work unwinds its cleanup (stop tasks, release locks) and the CLI prints one line."""

    def interrupt(signum, frame):
        raise Interrupted(signum)

    with signals_handled(INTERRUPTS, interrupt):
        yield
