"""LIBERO as RLDS/TFDS TFRecords (modified_libero_rlds, what Spatial Forcing's OpenVLA-OFT trainer reads).

Layout: `<suite>_no_noops/<version>/dataset_info.json` + shards `{name}-train.tfrecord-{i:05d}-of-{n:05d}`,
where `name` is the TFDS builder name (`liber_o10` for LIBERO-10). One record = one episode = one
tf.train.Example with step fields flattened over T. Without TensorFlow: the framing (u64 length,
masked CRC32C of it, data, masked CRC32C of the data) is read here with both CRCs checked, because
the `tfrecord` package skips CRCs and needs an index file to seek; `tf_example.Example` (a private
protobuf pool, so this works next to TensorFlow) parses the data.
episodes() reads every record once (sequential I/O, CRC check, proto parse, no JPEG decoding) and
keeps byte offsets, so read() reads exactly one record. Keys: `<dataset folder>/episode_<i:06d>`,
i counting records over shards in order, so episode i is TFDS's `train[i:i+1]`; its TFDS id
(`ReadConfig(add_tfds_id=True)`) is `<shard file name>__<index in shard>` (`sfcache.keys.tfds_ids`).
Frames are stored already rotated; proprio is `state` (8).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
from google.protobuf.message import DecodeError

from sfcache.errors import SourceError
from sfcache.keys import episode_key
from sfcache.sources.base import Episode, EpisodeInfo, Source, require_finite
from sfcache.sources.images import decode_views
from sfcache.sources.tf_example import Example

_MASK_DELTA = 0xA282EAD8
# Step fields every episode must hold: (list kind in the proto, values per step).
REQUIRED = {
    "steps/is_first": ("int64_list", 1),
    "steps/observation/state": ("float_list", 8),
    "steps/action": ("float_list", 7),
    "steps/language_instruction": ("bytes_list", 1),
}


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15, add a constant."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_record(handle, file: Path, offset: int, index: int) -> tuple[bytes, int]:
    """The record at `offset` with both CRCs checked; returns (data, next offset)."""
    handle.seek(offset)
    header = handle.read(12)
    if len(header) < 12:
        raise SourceError(file, f"truncated at byte {offset}: record {index} header cut short (expected 12 bytes)")
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc(header[:8]) != length_crc:
        raise SourceError(file, f"record {index} at byte {offset}: length CRC mismatch (corrupt TFRecord framing)")
    body = handle.read(length + 4)
    if len(body) < length + 4:
        raise SourceError(file, f"truncated at byte {offset}: record {index} holds {len(body)} of {length + 4} bytes")
    data, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
    if masked_crc(data) != data_crc:
        raise SourceError(file, f"record {index} at byte {offset}: data CRC mismatch (corrupt record)")
    return data, offset + 12 + length + 4


def write_record(handle, data: bytes) -> None:
    """Append one TFRecord: u64 length, its masked CRC32C, the data, the data's masked CRC32C."""
    length = struct.pack("<Q", len(data))
    handle.write(length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data)))


class LiberoRLDS(Source):
    """A TFDS version folder, a dataset folder holding one version, or a folder of such datasets."""

    format = "libero_rlds"
    jpeg_frames = True
    view_keys = {"primary": "steps/observation/image", "wrist": "steps/observation/wrist_image"}
    default_views = ("primary", "wrist")

    def _datasets(self) -> list[Path]:
        """Folders holding dataset_info.json (the TFDS version folders)."""
        if (self.path / "dataset_info.json").is_file():
            return [self.path]
        found = sorted(
            {
                info.parent
                for pattern in ("*/dataset_info.json", "*/*/dataset_info.json")
                for info in self.path.glob(pattern)
            }
        )
        if not found:
            raise SourceError(self.path, "no TFDS dataset_info.json here or one/two folders below")
        versions: dict[Path, list[str]] = {}
        for folder in found:
            versions.setdefault(folder.parent, []).append(folder.name)
        for dataset, names in versions.items():
            if len(names) > 1:  # the same episodes twice, under TFDS ids (shard file names) that collide
                raise SourceError(
                    dataset,
                    f"holds {len(names)} versions ({', '.join(names)}); expected one version "
                    "per dataset: pass the version folder to extract, e.g. "
                    f"{dataset / names[-1]}",
                )
        return found

    def _shards(self, folder: Path) -> list[tuple[Path, int]]:
        """(shard file, episodes it should hold) from dataset_info.json's train split."""
        info_file = folder / "dataset_info.json"
        try:
            info = json.loads(info_file.read_text())
            split = next(s for s in info["splits"] if s["name"] == "train")
            lengths = [int(n) for n in split["shardLengths"]]
            name = info["name"]
        except (OSError, json.JSONDecodeError, KeyError, StopIteration, TypeError, ValueError) as err:
            raise SourceError(
                info_file,
                f"expected TFDS metadata with name and a train split's shardLengths ({type(err).__name__}: {err})",
            ) from None
        total = len(lengths)
        return [(folder / f"{name}-train.tfrecord-{i:05d}-of-{total:05d}", n) for i, n in enumerate(lengths)]

    def _files(self) -> list[Path]:
        return sorted(file for folder in self._datasets() for file, _ in self._shards(folder) if file.exists())

    def describe(self) -> dict:
        """Adds each shard's file name and episode count: a store maps TFDS ids to keys with them
        (`sfcache.keys.tfds_ids`)."""
        shards = []
        for folder in self._datasets():
            try:
                shards += [[folder.parent.name, file.name, count] for file, count in self._shards(folder)]
            except SourceError:  # unreadable metadata: its episodes are skipped (skip_bad) or fail
                continue
        return {**super().describe(), "tfds_shards": shards}

    def _scan(self) -> Iterator[Episode | SourceError]:
        for folder in self._datasets():
            prefix = folder.parent.name
            try:
                shards = self._shards(folder)
            except SourceError as err:
                yield err
                continue
            first = 0
            for file, expected in shards:
                yield from self._scan_shard(file, expected, prefix, first)
                first += expected

    def _scan_shard(self, file: Path, expected: int, prefix: str, first: int) -> Iterator[Episode | SourceError]:
        if not file.is_file():
            yield SourceError(file, f"missing shard (dataset_info.json lists it with {expected} episodes)")
            return
        size, offset, index = file.stat().st_size, 0, 0
        with open(file, "rb") as handle:
            while offset < size:
                key = episode_key(first + index, prefix)
                try:
                    data, next_offset = read_record(handle, file, offset, index)
                except SourceError as err:
                    yield SourceError(err.file, err.what, episode=key)
                    return  # framing lost: nothing after it can be found
                try:
                    steps, instruction = self._check(Example.FromString(data), file, key)
                    yield Episode(EpisodeInfo(key, instruction, steps), file, (offset, index))
                except DecodeError:
                    yield SourceError(file, f"record {index} is not a tf.train.Example", episode=key)
                except SourceError as err:
                    yield err
                offset, index = next_offset, index + 1
        if index != expected:
            yield SourceError(file, f"holds {index} episodes, dataset_info.json says {expected}")

    def _check(self, example: Example, file: Path, key: str) -> tuple[int, str]:
        features = example.features.feature
        fields = dict(REQUIRED, **{self.view_keys[view]: ("bytes_list", 1) for view in self.views})
        for name, (kind, _) in fields.items():
            if name not in features:
                raise SourceError(file, f"missing feature (expected {kind})", episode=key, key=name)
            if features[name].WhichOneof("kind") != kind:
                raise SourceError(
                    file, f"holds {features[name].WhichOneof('kind')}, expected {kind}", episode=key, key=name
                )
        steps = len(features["steps/is_first"].int64_list.value)
        if steps == 0:
            raise SourceError(file, "empty episode (0 steps)", episode=key, key="steps/is_first")
        for name, (kind, width) in fields.items():
            count = len(getattr(features[name], kind).value)
            if count != steps * width:
                raise SourceError(file, f"{count} values, expected {steps} steps x {width}", episode=key, key=name)
        return steps, features["steps/language_instruction"].bytes_list.value[0].decode("utf-8", "replace")

    @staticmethod
    def _load(episode: Episode) -> Example:
        offset, index = episode.where
        with open(episode.file, "rb") as handle:
            try:
                data, _ = read_record(handle, episode.file, offset, index)
            except SourceError as err:
                raise SourceError(err.file, err.what, episode=episode.info.key) from None
        return Example.FromString(data)

    def _features(self, episode: Episode):
        """The episode record's feature map (the record is loaded once per episode)."""
        return self._last_loaded(episode, lambda: self._load(episode)).features.feature

    def _read_frames(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        features = self._features(episode)
        names = [self.view_keys[view] for view in self.views]
        return decode_views(
            [features[name].bytes_list.value[start:stop] for name in names],
            self.views,
            names,
            start,
            episode.file,
            episode.info.key,
            fast_dct=self.jpeg_fast_dct,
        )

    def _read_vectors(self, episode: Episode, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        key, file, features = episode.info.key, episode.file, self._features(episode)
        actions = np.asarray(features["steps/action"].float_list.value, np.float32).reshape(-1, 7)[start:stop]
        proprio = np.asarray(features["steps/observation/state"].float_list.value, np.float32).reshape(-1, 8)
        proprio = proprio[start:stop]
        require_finite(actions, file, key, "steps/action", start)
        require_finite(proprio, file, key, "steps/observation/state", start)
        return actions, proprio
