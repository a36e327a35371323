"""Whether a store is whole: every done shard read back, then cross-checked against what was recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from sfcache.errors import NotAStore, StoreError
from sfcache.inspection.record import Record
from sfcache.inspection.store_access import lock_state, open_store
from sfcache.store import DONE_ARRAY, LOCK_NAME, MASK_ARRAY, Cache, decode, layer_array

LISTED = 20  # episode keys named in one failure line before "... and N more"


@dataclass(frozen=True)
class Failure(Record):
    where: str  # the file, array, shard or episode concerned
    what: str


@dataclass(frozen=True)
class CheckResult(Record):
    ok: bool
    failures: tuple[Failure, ...]
    shards_checked: int
    shards: int
    notes: tuple[str, ...] = ()  # what the check could not cover (no digests recorded)


def check(path: str | Path, progress: Progress | None = None) -> CheckResult:
    """Read every done shard, compare its files with the digests recorded when they were written (any changed
    byte, or another shard's file in its place), and cross-check index, arrays and done flags; never raises on a
    bad store (NotAStore for a path that is no store at all). Each failure names the file, array, shard or
    episode concerned."""
    path = Path(path)
    failures: list[Failure] = []

    def fail(where: str, what: str) -> None:
        failures.append(Failure(where, what))

    try:
        cache = open_store(path)
    except NotAStore:
        raise
    except StoreError as error:
        fail(str(path / "zarr.json"), str(error))
        return _check_result(failures, 0, 0)

    _check_index(cache, fail)
    arrays = _check_arrays(cache, fail)
    done = _check_done(cache, fail)
    if done is None or arrays is None:
        return _check_result(failures, 0, cache.num_shards)

    task = progress.add_task("check", total=int(done.sum())) if progress else None
    checked, unrecorded = 0, []
    for shard in np.flatnonzero(done).tolist():
        before = len(failures)
        _check_shard(cache, shard, arrays, fail)
        if not _check_digests(cache, shard, fail if len(failures) == before else lambda where, what: None):
            unrecorded.append(shard)  # (a shard already failing above is not reported twice)
        checked += 1
        if progress:
            progress.advance(task)
    notes = []
    if not cache.has_digests:
        notes.append(
            "no digests recorded: this store was written before sfcache recorded shard digests, so a flipped "
            "byte that still decodes, or a shard file moved to another position, cannot be seen (`sf extract "
            "--checksum` stores see flipped bytes; `--verify` recomputes steps)"
        )
    elif unrecorded:
        notes.append(
            f"no digests recorded for done shard(s) {_ranges(np.array(unrecorded))} (written before sfcache "
            "recorded them): their bytes are decoded and checked for NaN/Inf only"
        )
    if not done.all():
        keys = cache.missing_episodes()
        more = f" ... and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
        fail(
            "done",
            f"shards {_ranges(np.flatnonzero(~done))} not done: {len(keys)} episode(s) incomplete "
            f"({', '.join(keys[:LISTED])}{more}); run `sf extract` again to finish",
        )
    if (path / LOCK_NAME).exists():
        fail(str(path / LOCK_NAME), lock_state(path))
    return _check_result(failures, checked, cache.num_shards, notes)


def _ranges(numbers: np.ndarray) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs = np.split(numbers, np.flatnonzero(np.diff(numbers) != 1) + 1)
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)


def _check_result(failures: list[Failure], checked: int, shards: int, notes: list[str] = ()) -> CheckResult:
    return CheckResult(
        ok=not failures, failures=tuple(failures), shards_checked=checked, shards=shards, notes=tuple(notes)
    )


def _check_digests(cache: Cache, shard: int, fail) -> bool:
    """A done shard's files against the digests recorded when it was written; False when none were recorded."""
    if not cache.has_digests:
        return True  # said once for the whole store
    try:
        if cache.recorded_digests(shard) is None:
            return False
        if not cache.missing_shard_files([shard]):  # a missing file is reported by _check_shard
            problem = cache.digest_problem(shard)
            if problem:
                fail(f"shard {shard}", problem)
    except StoreError as error:
        fail(f"digests shard {shard}", str(error))
    return True


def _check_index(cache: Cache, fail) -> None:
    """Every inconsistency of the episode index (`Provenance.index_problems`), not only the first."""
    for attribute, problem in cache.provenance.index_problems():
        fail(f"zarr.json {attribute}", problem)


def _check_arrays(cache: Cache, fail) -> dict[int | str, list[str]] | None:
    """Each layer's arrays (values, int8 scales, a reduced store's basis) and the token mask exist with the shape,
    shard shape and dtype the provenance promises; {layer or MASK_ARRAY: names read per shard} if all do."""
    problems = {name: cache.array_problem(name) for name in cache.expected_arrays()}
    for name, problem in problems.items():
        if problem is not None:
            fail(name, problem)
        elif name.endswith(("_mean", "_basis")) and not np.isfinite(values := cache.read_stored(name)).all():
            fail(
                name,
                f"shape {values.shape} (finite: False), expected {values.shape} finite float32 from the provenance",
            )
            problems[name] = "not finite"
    if any(problems.values()):
        return None
    return cache.shard_arrays()


def _check_done(cache: Cache, fail) -> np.ndarray | None:
    try:
        done = cache.read_stored(DONE_ARRAY)
    except (StoreError, ValueError, OSError) as error:
        fail("done", f"done-marker array missing or unreadable ({type(error).__name__}: {error})")
        return None
    if done.shape[0] < cache.num_shards or not np.isin(done, (0, 1)).all():
        fail(
            "done",
            f"{done.shape[0]} flags with values {sorted(set(done.tolist()))[:5]}, "
            f"expected {cache.num_shards} flags of 0 or 1",
        )
        return None
    return done[: cache.num_shards].astype(bool)


def _check_shard(cache: Cache, shard: int, arrays: dict[int | str, list[str]], fail) -> None:
    """A done shard: its files exist, decode (shard-index checksums), and hold finite values."""
    rows = cache.shard_rows(shard)
    for layer, named in arrays.items():
        read = {}
        for name in named:
            file = cache.shard_file(name, shard)
            if not file.is_file():
                fail(str(file), f"shard {shard} is marked done but its file is missing")
                continue
            try:
                read[name] = cache.read_stored(name, rows)
            except Exception as error:  # any decode failure (checksum, truncation, codec) means a bad shard file
                fail(str(file), f"shard {shard} unreadable ({type(error).__name__}: {error})")
        if len(read) != len(named):
            continue
        if layer == MASK_ARRAY:
            if not np.isin(read[MASK_ARRAY], (0, 1)).all():
                fail(f"{MASK_ARRAY} shard {shard}", "values other than 0 and 1")
            continue
        values = layer_array(layer)
        bad = ~np.isfinite(decode(read[values], cache.dtype, read.get(layer_array(layer, "_scale"))))
        if bad.any():
            row, view, token, _ = (int(i) for i in np.argwhere(bad)[0])
            key, step = cache.index.locate(rows.start + row)
            fail(
                f"{values} shard {shard}",
                f"{int(bad.sum())} non-finite value(s) (NaN/Inf); first at episode {key} step {step} "
                f"view {cache.views[view]} token {token}",
            )
