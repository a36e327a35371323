"""Flat rows of episodes packed back to back (LeRobot style): the one place that maps rows to steps and back.

Episode `e` occupies rows [start_e, start_e + length_e); the store, the loaders and the extractor all
ask this index, so "row -> (episode, step)" is computed one way everywhere.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from sfcache.errors import StoreError

__all__ = ["EpisodeRecord", "RowIndex", "pack_episodes"]


class EpisodeRecord(NamedTuple):
    """Where an episode's steps live: rows [start, start + length)."""

    key: str
    instruction: str
    start: int
    length: int


def _packed(episodes: Iterable[tuple[str, str, int]]) -> tuple[EpisodeRecord, ...]:
    """(key, instruction, length) in row order -> records starting where the previous one ends."""
    records, start = [], 0
    for key, instruction, length in episodes:
        records.append(EpisodeRecord(key, instruction, start, int(length)))
        start += int(length)
    return tuple(records)


def pack_episodes(episodes: Sequence) -> tuple[EpisodeRecord, ...]:
    """Rows for `Source.episodes()` packed back to back in the given order (LeRobot-style flat steps)."""
    return _packed((info.key, info.instruction, info.num_steps) for info in episodes)


class RowIndex:
    """Episodes as flat rows: row -> (key, step), (key, step) -> row, and a row range split per episode.

    `records`: EpisodeRecord or [key, instruction, start, length] lists (a store's attrs, `Cache.index`'s
    records), in row order; `where` starts each error message (the store's path) and `holder` names what holds
    the episodes ("episode 'k' is not in <holder>").
    """

    def __init__(self, records: Sequence, where: str = "rows", holder: str = "the cache"):
        self.records = tuple(EpisodeRecord(*record) for record in records)
        self.where, self.holder = str(where), holder
        self.keys = [record.key for record in self.records]
        self.starts = [record.start for record in self.records]
        self.num_rows = self.records[-1].start + self.records[-1].length if self.records else 0
        self._by_key = {record.key: record for record in self.records}

    @classmethod
    def packed(cls, lengths: Mapping[str, int], where: str = "rows", holder: str = "the cache") -> RowIndex:
        """{key: length} in row order, first rows from the running sum of lengths."""
        return cls(_packed((key, "", length) for key, length in lengths.items()), where, holder)

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> EpisodeRecord | None:
        return self._by_key.get(key)

    def spans(self) -> dict[str, tuple[int, int]]:
        """{key: (first row, length)} in row order."""
        return {record.key: (record.start, record.length) for record in self.records}

    def record(self, key: str) -> EpisodeRecord:
        """The record of `key`; StoreError naming the key and a few that exist."""
        found = self._by_key.get(key)
        if found is None:
            raise StoreError(
                f"{self.where}: episode {key!r} is not in {self.holder} "
                f"({len(self.keys)} episodes, e.g. {self.keys[:3]})"
            )
        return found

    def position(self, row: int) -> tuple[int, int]:
        """(episode position in row order, step) of flat `row`; StoreError outside [0, num_rows)."""
        row = int(row)
        if not 0 <= row < self.num_rows:
            raise StoreError(f"{self.where}: row {row} is outside [0, {self.num_rows})")
        position = bisect.bisect_right(self.starts, row) - 1
        return position, row - self.starts[position]

    def locate(self, row: int) -> tuple[str, int]:
        """(episode key, step) of flat `row`."""
        position, step = self.position(row)
        return self.keys[position], step

    def row(self, key: str, step: int) -> int:
        """Flat row of `step` in episode `key`; StoreError naming the key and its steps when out of range."""
        record = self.record(key)
        if not 0 <= int(step) < record.length:
            raise StoreError(f"{self.where}: episode {key!r} has steps [0, {record.length}), asked step {step}")
        return record.start + int(step)

    def pieces(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        """Rows [start, stop) as (episode key, first step, stop step) pieces, one per episode touched;
        StoreError naming the rows unless 0 <= start <= stop <= num_rows."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.num_rows:
            raise StoreError(f"{self.where}: rows [{start}, {stop}) are not a range inside [0, {self.num_rows})")
        out = []
        position = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            first = self.starts[position]
            piece_stop = min(stop, first + self.records[position].length)
            if piece_stop > start:
                out.append((self.keys[position], start - first, piece_stop - first))
            start, position = piece_stop, position + 1
        return out
