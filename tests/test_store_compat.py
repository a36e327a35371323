"""Stores written by an earlier sfcache (tests/data/old_stores, made by tests/data/make_old_stores.py with the code
of c8760c4) read and resume with today's, and today's writer still writes the same bytes; the provenance records
name a damaged field and declare which fields are a store's (or a run's) identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from sfcache.errors import ConfigMismatch, StoreError
from sfcache.inspection import check
from sfcache.provenance import (
    Provenance,
    ReduceProvenance,
    TargetsProvenance,
    VggtProvenance,
    dataset_differences,
    differences,
    identity_fields,
)
from sfcache.store import create, create_store, decode, encode, lock_store, open_cache, resume
from sfcache.train.loop import TrainConfig
from tests.data.make_old_stores import HERE, LAYER, VARIANTS, config, targets, write

NAMES = sorted(VARIANTS)


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(HERE / name, tmp_path / name))


def _as_stored(name: str) -> np.ndarray:
    made = config(name)
    stored, scale = encode(targets(made), made.dtype)
    return decode(stored, made.dtype, scale)


@pytest.mark.parametrize("name", NAMES)
def test_an_old_store_reads_as_it_was_written(name):
    cache = open_cache(HERE / name, complete=True, verify=True)
    assert cache.done_shards().tolist() == [True, True, True, False]
    rows = np.arange(cache.shard_rows(2).stop)
    np.testing.assert_array_equal(cache.read_rows(rows), _as_stored(name)[rows])
    assert cache.provenance.targets.dtype == name and cache.missing_episodes() == ["suite/b/demo_0"]


@pytest.mark.parametrize("name", NAMES)
def test_an_old_store_resumes_to_a_complete_one(name, tmp_path):
    path = _copy(name, tmp_path)
    made = config(name)
    with lock_store(path):
        writer = create_store(path, made)  # same configuration: resumed, not recreated
        assert writer.done_shards().tolist() == [True, True, True, False]
        writer.write_shard(3, {LAYER: targets(made)[writer.shard_rows(3)]})
    np.testing.assert_array_equal(open_cache(path).read_rows(slice(None)), _as_stored(name))
    assert check(path).ok


@pytest.mark.parametrize("name", NAMES)
def test_todays_writer_writes_the_old_bytes(name, tmp_path):
    write(tmp_path / name, config(name))
    for old in sorted(p for p in (HERE / name).rglob("*") if p.is_file()):
        new = tmp_path / name / old.relative_to(HERE / name)
        if old.name == "zarr.json":
            assert _without_version(new) == _without_version(old), old
        else:
            assert new.read_bytes() == old.read_bytes(), old


def _without_version(meta: Path) -> dict:
    document = json.loads(meta.read_text())
    document.get("attributes", {}).get("sfcache", {}).pop("sfcache_version", None)
    return document


def test_create_and_resume_are_explicit(tmp_path):
    path = _copy("float16", tmp_path)
    with lock_store(path):
        with pytest.raises(StoreError, match="already holds a store; resume it"):
            create(path, config("float16"))
        with pytest.raises(ConfigMismatch, match="targets.dtype"):
            resume(path, config("int8"))
        assert create(path, config("int8"), overwrite=True).done_shards().tolist() == [False] * 4
    with lock_store(tmp_path / "none"), pytest.raises(StoreError, match="holds no store to resume"):
        resume(tmp_path / "none", config("float16"))


@pytest.mark.parametrize(
    "dotted, value, named, held, expected",
    [
        ("num_steps", -1, "num_steps", "-1", "an integer >= 0"),
        ("targets.channels", "8", "targets.channels", '"8"', "a positive integer"),
        ("targets.dtype", "float8", "targets.dtype", '"float8"', "one of float16, bfloat16, int8"),
        ("targets.layers", None, "targets.layers", "null", "a non-empty list of layer indices"),
        ("vggt.weights_id", 3, "vggt.weights_id", "3", "a string or null"),
        ("episodes.1", ["k", "i", 0], "episodes[1]", '["k", "i", 0]', "[key, instruction, start, length]"),
        ("targets.reduce", {"method": "pca"}, "targets.reduce.asked", "missing", "a string"),
    ],
)
def test_a_record_names_its_bad_field(dotted, value, named, held, expected, tmp_path):
    attrs = json.loads((HERE / "float16" / "zarr.json").read_text())["attributes"]["sfcache"]
    *parents, last = dotted.split(".")
    node = attrs
    for part in parents:
        node = node[part]
    node[int(last) if isinstance(node, list) else last] = value
    with pytest.raises(StoreError) as refused:
        Provenance.validate(attrs, tmp_path / "zarr.json")
    assert str(refused.value) == (
        f"{tmp_path / 'zarr.json'}: attributes.sfcache.{named} is {held}, expected {expected}; "
        "the store is damaged: delete it and run `sf extract` again"
    )


def test_required_fields_are_asked_only_of_a_complete_store(tmp_path):
    attrs = json.loads((HERE / "int8" / "zarr.json").read_text())["attributes"]["sfcache"]
    del attrs["vggt"]
    Provenance.validate(attrs, tmp_path)  # a library reader needs no model record
    with pytest.raises(StoreError, match=r"vggt\.weights is missing, expected present"):
        Provenance.validate(attrs, tmp_path, complete=True)


def test_identity_is_declared_once_on_the_fields():
    assert identity_fields(VggtProvenance) == ["weights_id", "config", "compute_dtype", "preprocess"]
    assert identity_fields(ReduceProvenance) == ["asked", "min_cosine", "sample_steps", "held_out_steps"]
    assert identity_fields(TargetsProvenance) == [
        *("layers", "grid", "views", "channels", "dtype", "codec", "checksum", "mask"),
        *(f"reduce.{name}" for name in identity_fields(ReduceProvenance)),
    ]
    assert identity_fields(TrainConfig) == ["batch_size", "align_weight", "seed"]
    old = json.loads((HERE / "float16" / "zarr.json").read_text())["attributes"]["sfcache"]
    asked = {**old, "created": "later", "sfcache_version": "9", "source": {**old["source"], "path": "/moved"}}
    assert differences(old, asked) == {}  # informational fields, and where the data lies, are no identity
    asked["targets"] = {**old["targets"], "dtype": "int8"}
    asked["episodes"] = old["episodes"][:2]
    assert differences(old, asked) == {
        "episodes": ("3 episodes, 15 steps", "2 episodes, 12 steps"),
        "targets.dtype": ("float16", "int8"),
    }


def test_same_dataset_is_one_rule():
    recorded = {"format": "libero_hdf5", "path": "/a", "rotate": True, "fingerprint": "sha256:0"}
    assert dataset_differences(recorded, {**recorded, "path": "/moved"}) == {}  # a moved copy is the same data
    assert dataset_differences(recorded, {**recorded, "path": "/b", "fingerprint": "sha256:1"}) == {
        "source.fingerprint": ("sha256:0", "sha256:1"),
        "source.path": ("/a", "/b"),
    }
