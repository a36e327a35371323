"""What a store promises against what is on disk: its arrays, each shard file against its recorded digest.

`sfcache.inspection.check` and the extractor's resume ask these of a `Cache` (a mixin: it needs the cache's arrays).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import google_crc32c
import numpy as np

from sfcache.errors import StoreError
from sfcache.store.layout import DIGESTS_ARRAY, DONE_ARRAY, MASK_ARRAY, NO_FILE, expected_arrays

__all__ = ["Integrity"]


class Integrity:
    """`Cache`'s checks of its arrays and shard files (needs `path`, `provenance`, `shard_file`, `_open`, `_array`,
    `_target_arrays`, `done_shards`, `num_shards`, `steps_per_shard`)."""

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every array the provenance promises besides `done`, with its shape and stored dtype (`layout`)."""
        return expected_arrays(self.provenance)

    def array_problem(self, name: str) -> str | None:
        """What is wrong with array `name` of `expected_arrays()` (missing, unreadable, another shape, dtype or
        shard size, a basis chunk gone), or None when it is as promised."""
        shape, dtype = self.expected_arrays()[name]
        basis = name.endswith(("_mean", "_basis"))
        kind = "PCA basis" if basis else "token mask" if name == MASK_ARRAY else "array"
        try:
            array = self._open(name)
        except StoreError as error:
            return f"{kind} missing or unreadable ({error})"
        if array.shape != shape or array.dtype != dtype:
            return f"shape {array.shape} {array.dtype}, expected {shape} {dtype} from the provenance"
        if basis and not (self.path / name / array.metadata.encode_chunk_key((0,) * array.ndim)).is_file():
            return f"{kind} missing or unreadable (its chunk file is gone: it would read as zeros)"
        if not basis and name != MASK_ARRAY and (array.shards is None or array.shards[0] != self.steps_per_shard):
            return f"shards {array.shards}, expected {self.steps_per_shard} steps per shard"
        return None

    def read_stored(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of array `name` exactly as stored (not decoded, no done flag asked): zarr's own error on damage."""
        return self._open(name)[rows] if name == DONE_ARRAY else self._array(name)[rows]

    def shard_digests(
        self, shard: int, known: Mapping[str, list[int] | None] | None = None
    ) -> dict[str, list[int] | None]:
        """[size, CRC32C] of each target array's file of a shard (None where missing), as seen from here.

        The writer records these (`StoreWriter.write_shard`) and reports them; the extraction client compares them
        with its own view of the file system before it counts the shard done (a worker writing to a private /tmp
        is caught), and `digest_problem` compares them with the record. CRC32C (hardware, ~17 GB/s here) rather
        than a cryptographic hash: it guards against rot and misplaced files, not against an attacker.
        """
        digests: dict[str, list[int] | None] = {}
        for name in self._target_arrays():
            file = self.shard_file(name, shard)
            if (known or {}).get(name) is not None:  # computed as it was written (`known`: {array: digest})
                digests[str(file.relative_to(self.path))] = known[name]
                continue
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                digests[str(file.relative_to(self.path))] = None
                continue
            except OSError as err:
                raise StoreError(f"{file}: shard {shard} is unreadable ({err.strerror})") from None
            digests[str(file.relative_to(self.path))] = [len(data), google_crc32c.value(data)]
        return digests

    @property
    def has_digests(self) -> bool:
        """False for a store written before shard digests were recorded (its shards cannot be checked by them)."""
        return (self.path / DIGESTS_ARRAY / "zarr.json").is_file()

    def recorded_digests(self, shard: int) -> dict[str, list[int] | None] | None:
        """The digests recorded when `shard` was written, shaped as `shard_digests`; None if none were recorded."""
        if not self.has_digests:
            return None
        row = self._array(DIGESTS_ARRAY)[shard]
        files = [str(self.shard_file(name, shard).relative_to(self.path)) for name in self._target_arrays()]
        if row.shape != (len(files), 2):
            raise StoreError(
                f"{self.path / DIGESTS_ARRAY / 'zarr.json'}: holds {row.shape} per shard, expected "
                f"({len(files)}, 2) (size and CRC32C of each of {len(files)} shard files); the store is damaged"
            )
        if not row[:, 0].any():
            return None
        return {
            file: None if size == NO_FILE else [int(size), int(crc)]
            for file, (size, crc) in zip(files, row.tolist(), strict=True)
        }

    def digest_problem(self, shard: int) -> str | None:
        """How shard `shard`'s files differ from the digests recorded when it was written (the first differing
        file named), or None when they match or none were recorded (`recorded_digests`)."""
        recorded = self.recorded_digests(shard)
        if recorded is None:
            return None
        found = self.shard_digests(shard)
        for file, want in recorded.items():
            got = found.get(file)
            if got != want:
                return (
                    f"{self.path / file}: shard {shard} does not match the digest recorded when it was written "
                    f"({_digest_text(got)}, recorded {_digest_text(want)}): its bytes changed on disk, or "
                    "another shard's file was moved or copied here"
                )
        return None

    def missing_shard_files(self, shards: Sequence[int] | None = None) -> dict[int, Path]:
        """Done shards (all, or the given ones) with a target file missing: {shard: first missing file}.

        Real targets are never all zero, so a done shard always has a file per target array.
        """
        done = self.done_shards() if shards is None else np.zeros(self.num_shards, bool)
        if shards is not None:
            done[np.asarray(list(shards), dtype=np.int64)] = self.done_shards(list(shards))
        missing = {shard: self._missing_file(shard) for shard in np.flatnonzero(done).tolist()}
        return {shard: file for shard, file in missing.items() if file is not None}

    def _missing_file(self, shard: int) -> Path | None:
        return next(
            (file for file in (self.shard_file(name, shard) for name in self._target_arrays()) if not file.is_file()),
            None,
        )


def _digest_text(digest: list[int] | None) -> str:
    return "no file" if digest is None else f"{digest[0]} bytes, CRC32C {digest[1]:08x}"
