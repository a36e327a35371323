"""What extraction reports: a task's typed report to the client, a run's summary to its caller."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sfcache.errors import Message, SourceError
from sfcache.extract.config import named

Digests = dict[str, list[int] | None]  # per shard file: [size, CRC32C] as written (None: missing)


@dataclass(frozen=True)
class ShardFailure:
    """A shard left not done because its source data could not be read (a SourceError on the worker)."""

    shard: int
    file: str
    what: str
    episode: str | None
    key: str | None
    message: str

    @classmethod
    def of(cls, shard: int, error: SourceError) -> ShardFailure:
        return cls(shard, error.file, str(error.what), error.episode, error.key, str(error))

    def error(self) -> SourceError:
        """The SourceError that stops a run (without --skip-bad), naming the shard left not done."""
        return SourceError(
            self.file, f"{self.what} (shard {self.shard} left not done)", episode=self.episode, key=self.key
        )


@dataclass
class TaskReport:
    """What a shard task did, sent back to the client through Dask (pickled). Expected failures are data here,
    never exceptions, so Dask does not retry a bad file; the client confirms `written` before marking it done."""

    host: str  # the worker's host name
    store: str  # the store's real path as the worker sees it
    written: dict[int, Digests] = field(default_factory=dict)  # shard -> its files' digests, recorded, not done
    adopted: list[int] = field(default_factory=list)  # written by an earlier attempt; in `written` too
    failed: list[ShardFailure] = field(default_factory=list)
    error: Message | None = None  # the task's first other failure, one line
    error_shard: int | None = None  # the shard it failed on
    traceback: str = ""  # an unexpected failure's traceback, for the store's error log


@dataclass(frozen=True)
class ExtractSummary:
    """What `extract` did: the store's state after the run, this run's work and timing (`sf extract` prints it)."""

    store: str
    format: str
    views: list[str]
    recipe: str
    layers: list[int]
    episodes: int  # selected episodes
    steps: int  # rows of the store
    shards_done: int
    shards: int
    extracted_steps: int  # by this run (adopted ones included)
    adopted_steps: int  # written by an earlier attempt (a dead worker or client), confirmed by this run
    already_done_steps: int  # done (confirmed) before this run
    failed: list[dict]  # ShardFailure as a dict: {"shard", "file", "what", "episode", "key", "message"}
    repaired: list[dict]  # {"shard", "why"}: why is text or a `Message` naming config fields
    run: str  # the run id (the store's write fence)
    skipped_episodes: list[str]
    basis: str  # none | fitted | reused
    reduce: dict | None  # attrs["targets"]["reduce"] of a reduced store
    missing_episodes: list[str]
    workers: int
    device: str
    weights_id: str
    cluster_startup_s: float
    extract_s: float
    steps_per_s: float
    total_s: float


def cause(error: BaseException, batch_size: int | None = None) -> Message:
    """The cause of an unexpected task failure in one line; running out of memory names the options that lower it."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    lowered = first.lower()
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        words in lowered for words in ("out of memory", "can't allocate memory", "cannot allocate memory")
    ):
        return Message(
            f"out of memory ({text}); lower ",
            named("batch_size"),
            "" if batch_size is None else f" (now {batch_size})",
            " (steps per VGGT forward pass), or ",
            named("steps_per_shard"),
            " (a shard's targets are held until written)",
        )
    return Message(text)
