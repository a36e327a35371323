"""Errors for expected problems: the CLI prints them as one line, never a traceback."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial


@dataclass(frozen=True)
class Field:
    """A config field that a message names: `ExtractConfig.layers` in the library's words; `sf` shows the flag
    that sets it in the command that failed instead (`sfcache.cli.options.flag_names`)."""

    config: str  # the config dataclass's name
    name: str

    def __str__(self) -> str:
        return f"{self.config}.{self.name}"


def field_of(config: type, name: str) -> Field:
    """`config`'s field `name` as messages name it."""
    if name not in getattr(config, "__dataclass_fields__", {}):
        raise AttributeError(f"{config.__name__} has no field {name!r}")
    return Field(config.__name__, name)


def extraction_field(name: str) -> Field:
    """`sfcache.extract.ExtractConfig`'s field `name` for the modules extraction builds on (the store, this one),
    which cannot import it: what their messages tell a user to set (`sf extract` shows its flag)."""
    return Field("ExtractConfig", name)


class Message(tuple):
    """Text that names config fields: its parts are strings and `Field`s. `str()` is the library's words
    (`ExtractConfig.layers 99: ...`); `render` names each field as a caller does (`--layers 99: ...`)."""

    def __new__(cls, *parts: str | Field | Message) -> Message:
        flat: list[str | Field] = []
        for part in parts:
            for piece in part if isinstance(part, Message) else (part,):
                if isinstance(piece, Field):
                    flat.append(piece)
                elif flat and isinstance(flat[-1], str):
                    flat[-1] += str(piece)
                elif piece:
                    flat.append(str(piece))
        return super().__new__(cls, flat)

    def __getnewargs__(self) -> tuple:
        return tuple(self)

    def __str__(self) -> str:
        return "".join(map(str, self))

    def __add__(self, other: str | Field | Message) -> Message:
        return Message(self, other)

    def __radd__(self, other: str | Field | Message) -> Message:
        return Message(other, self)

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(part for part in self if isinstance(part, Field))

    def render(self, name: Callable[[Field], str]) -> str:
        """The text with each field named by `name` (a command's flag for it)."""
        return "".join(name(part) if isinstance(part, Field) else part for part in self)

    def renamed(self, fields: Mapping[Field, Field]) -> Message:
        """The same text naming, for each of `fields`' keys, the field that sets it (a config handing its fields on
        to another names that config's checks in its own fields)."""
        return Message(*(fields.get(part, part) if isinstance(part, Field) else part for part in self))

    @staticmethod
    def join(separator: str, messages: Iterable[str | Message]) -> Message:
        parts: list[str | Message] = []
        for message in messages:
            parts += [separator, message] if parts else [message]
        return Message(*parts)


class SfcacheError(Exception):
    """An expected, user-fixable problem (bad input, wrong config, missing file). Its message may name config
    fields (a `Message`): the library speaks of `ExtractConfig.layers`, `sf` of the flag that sets it."""

    @property
    def message(self) -> Message:
        """The message with the fields it names (a plain text names none)."""
        first = self.args[0] if len(self.args) == 1 else str(self)
        return first if isinstance(first, Message) else Message(str(first))

    def name_fields(self, name: Callable[[Field], str]) -> None:
        """From now on say the message with each field it names as `name` calls it: what `sf` does with the error
        of a command, naming fields as the command's flags (`sfcache.cli.options`)."""
        if self.message.fields:
            self.args = (self.message.render(name),)


def raise_problems(problems: list[str | Message]) -> None:
    """One SfcacheError listing every problem found: a config reports all of them at once, not the first."""
    if problems:
        raise SfcacheError(Message.join("; ", problems))


class SourceError(SfcacheError):
    """A dataset file does not hold what its format promises."""

    def __init__(self, file, what: str | Message, *, episode: str | None = None, key: str | None = None):
        self.file, self.episode, self.key, self.what = str(file), episode, key, what
        where = [self.file]
        if episode is not None:
            where.append(f"episode {episode}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(Message(f"{', '.join(where)}: ", what))

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
    and ends with `fix`, what to do about it (a store's: start it over with ExtractConfig.overwrite)."""

    OVERWRITE = Message("use ", extraction_field("overwrite"), " to replace it, or another ", extraction_field("out"))

    def __init__(
        self,
        store,
        differences: dict[str, tuple[object, object]],
        *,
        fix: str | Message = OVERWRITE,
        holder: str = "store",
    ):
        self.store, self.differences, self.fix, self.holder = str(store), differences, fix, holder
        lines = "; ".join(f"{k}: {holder} has {a!r}, asked {b!r}" for k, (a, b) in differences.items())
        super().__init__(Message(f"{store}: configuration differs ({lines}); ", fix))

    def with_fix(self, fix: str | Message) -> ConfigMismatch:
        """The same differences with another remedy (a caller that starts over otherwise than with overwrite)."""
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
