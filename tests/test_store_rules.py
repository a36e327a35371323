"""The small rules with one home each: row lookup, layer choice, provenance comparison and records, episode keys."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sfcache.cli.options import named_as_flags
from sfcache.errors import ConfigMismatch, Field, StoreError, differences, field_of
from sfcache.extract import ExtractConfig
from sfcache.keys import episode_key, tfds_ids
from sfcache.provenance import Fidelity, Provenance
from sfcache.recipes import PREPROCESS, RECIPE, VIEWS
from sfcache.rows import RowIndex
from sfcache.sources.base import EpisodeInfo
from sfcache.store import create_store, lock_store, open_cache, pack_episodes
from sfcache.store.cache import REPAIR
from sfcache.store.run_control import OUT
from sfcache.store.writer import OVERWRITE, create
from sfcache.train.loop import TrainConfig
from tests.test_reduce import low_rank, write_reduced
from tests.test_store import build, make_config

UNEVEN = {"a": 5, "b": 1, "c": 7, "d": 3}  # rows a 0-4, b 5, c 6-12, d 13-15


# ----------------------------------------------------------------------------- rows


def test_row_lookup_round_trips_every_row_of_uneven_episodes():
    index = RowIndex.packed(UNEVEN, where="store")
    assert index.num_rows == 16 and index.spans() == {"a": (0, 5), "b": (5, 1), "c": (6, 7), "d": (13, 3)}
    pairs = [(key, step) for key, length in UNEVEN.items() for step in range(length)]
    assert [index.locate(row) for row in range(16)] == pairs
    assert [index.row(key, step) for key, step in pairs] == list(range(16))
    assert index.locate(15) == ("d", 2) and index.position(6) == (2, 0)


@pytest.mark.parametrize("row", [-1, 16, 100])
def test_rows_outside_the_index_are_an_error_naming_the_range(row):
    with pytest.raises(StoreError, match=rf"store: row {row} is outside \[0, 16\)"):
        RowIndex.packed(UNEVEN, where="store").locate(row)


def test_unknown_keys_and_steps_are_errors_naming_them():
    index = RowIndex.packed(UNEVEN, where="store")
    with pytest.raises(
        StoreError, match=r"store: episode 'zz' is not in the cache \(4 episodes, e.g. \['a', 'b', 'c'\]\)"
    ):
        index.row("zz", 0)
    with pytest.raises(StoreError, match=r"episode 'b' has steps \[0, 1\), asked step 1"):
        index.row("b", 1)
    with pytest.raises(StoreError, match="asked step -1"):
        index.row("a", -1)


def test_pieces_split_a_row_range_per_episode_like_a_row_by_row_walk():
    index = RowIndex.packed(UNEVEN)
    for start in range(16):
        for stop in range(start + 1, 17):
            expected: dict[str, list[int]] = {}
            for row in range(start, stop):
                key, step = index.locate(row)
                expected.setdefault(key, []).append(step)
            assert index.pieces(start, stop) == [(key, steps[0], steps[-1] + 1) for key, steps in expected.items()]


@pytest.mark.parametrize(
    "lengths, start, stop, outside",
    [
        (UNEVEN, -2, 2, r"\[-2, 2\)"),
        (UNEVEN, 3, 17, r"\[3, 17\)"),
        (UNEVEN, 16, 40, r"\[16, 40\)"),
        (UNEVEN, 9, 4, r"\[9, 4\)"),
        ({}, 0, 1, r"\[0, 1\)"),
    ],
)
def test_pieces_outside_the_index_are_an_error_naming_the_rows(lengths, start, stop, outside):
    rows = sum(lengths.values())
    with pytest.raises(StoreError, match=rf"^store: rows {outside} are not a range inside \[0, {rows}\)$"):
        RowIndex.packed(lengths, where="store").pieces(start, stop)


def test_pieces_at_the_edges_and_of_zero_length_episodes():
    index = RowIndex.packed({"a": 2, "empty": 0, "b": 3}, where="store")
    assert index.pieces(0, 5) == [("a", 0, 2), ("b", 0, 3)] and index.pieces(5, 5) == index.pieces(2, 2) == []
    assert RowIndex.packed({}).pieces(0, 0) == []


def test_a_row_index_of_a_stores_attrs_equals_its_cache_index_and_names_its_holder(tmp_path):
    build(tmp_path / "s")
    cache = open_cache(tmp_path / "s")
    for records in (cache.attrs["episodes"], cache.index.records):  # what the extractor hands a RowIndex
        assert (
            RowIndex(records).pieces(3, 14)
            == cache.index.pieces(3, 14)
            == [("suite/a/demo_0", 3, 5), ("suite/a/demo_1", 0, 7), ("suite/b/demo_0", 0, 2)]
        )
    samples = RowIndex.packed(UNEVEN, where="training samples", holder="the training episodes")
    with pytest.raises(StoreError, match=r"^training samples: episode 'zz' is not in the training episodes \(4 "):
        samples.record("zz")


def test_a_store_index_is_its_recorded_episodes(tmp_path):
    build(tmp_path / "s")
    cache = open_cache(tmp_path / "s")
    assert cache.index.records == pack_episodes(
        [
            EpisodeInfo("suite/a/demo_0", "pick the bowl", 5),
            EpisodeInfo("suite/a/demo_1", "place the bowl", 7),
            EpisodeInfo("suite/b/demo_0", "open the drawer", 3),
        ]
    )
    assert cache.index.locate(14) == ("suite/b/demo_0", 2) and cache.episode("suite/a/demo_1").start == 5


# ----------------------------------------------------------------------------- layers


def test_layer_choice_errors_name_the_stored_layers(tmp_path):
    with lock_store(tmp_path / "s"):  # VGGT depth 4 in make_config; no shard needs writing
        cache = create_store(tmp_path / "s", make_config(layers=(1, 3)))
    assert cache.resolve_layer(3) == 3 and cache.resolve_layer(-1) == 3 and cache.resolve_layer(-3) == 1
    with pytest.raises(StoreError, match=r"2 layers are stored, so one must be chosen; stored layers: \[1, 3\]"):
        cache.resolve_layer(None)
    with pytest.raises(StoreError, match=r"layer 2 is not stored; stored layers: \[1, 3\]"):
        cache.resolve_layer(2)
    with pytest.raises(StoreError, match=r"layer -2 is not stored; stored layers: \[1, 3\]"):
        cache.read_rows([0], layer=-2)


def test_the_only_stored_layer_is_the_default(tmp_path):
    build(tmp_path / "s")
    assert open_cache(tmp_path / "s").resolve_layer(None) == 3


# ----------------------------------------------------------------------------- comparisons


def test_differences_list_each_differing_field_in_the_order_given():
    recorded = {"views": ["a", "b"], "vggt": {"weights_id": "x", "config": {"depth": 4}}, "seed": 0}
    asked = {"views": ["a", "b"], "vggt": {"weights_id": "y", "config": {"depth": 4}}, "extra": 1}
    assert differences(recorded, asked, ["seed", "vggt.weights_id", "views", "vggt.config", "extra", "vggt.nope"]) == {
        "seed": (0, None),
        "vggt.weights_id": ("x", "y"),
        "extra": (None, 1),
    }
    assert differences(recorded, recorded, recorded) == {}
    assert (
        str(ConfigMismatch("S", differences(recorded, asked, ["vggt.weights_id"])))
        == "S: configuration differs (vggt.weights_id: store has 'x', asked 'y'); use ExtractConfig.overwrite to "
        "replace it, or another ExtractConfig.out"
    )


def test_a_store_made_differently_lists_its_differences(tmp_path):
    build(tmp_path / "s")
    with pytest.raises(ConfigMismatch) as raised:
        build(tmp_path / "s", channels=16, source={**make_config().source, "rotate": False})
    assert raised.value.differences == {"targets.channels": (8, 16), "source.rotate": (True, False)}


# ----------------------------------------------------------------------------- provenance


def test_provenance_round_trips_the_attrs_of_a_store(tmp_path):
    build(tmp_path / "s", dtype="int8", checksum=True)
    cache = open_cache(tmp_path / "s")
    raw = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["sfcache"]
    assert cache.provenance.to_attrs() == raw and json.dumps(cache.provenance.to_attrs()) == json.dumps(raw)
    targets = cache.provenance.targets
    assert (targets.layers, targets.grid, targets.int8_block, targets.checksum, targets.mask) == (
        (3,),
        (2, 3),
        8,
        "crc32c",
        "none",
    )
    assert cache.provenance.vggt.depth == 4 and cache.provenance.episodes[1].key == "suite/a/demo_1"


def test_provenance_of_a_reduced_store_is_typed_and_round_trips(tmp_path):
    cache = write_reduced(tmp_path / "r", low_rank(64, 4, 16, 0.05), "pca:6")
    reduce = cache.provenance.targets.reduce
    assert (reduce.asked, reduce.k, reduce.sample_steps + reduce.held_out_steps) == ("pca:6", {0: 6}, 64)
    assert isinstance(reduce.fidelity[0], Fidelity) and 0.9 < reduce.fidelity[0].mean <= 1
    assert cache.provenance.to_attrs() == cache.attrs
    assert cache.reduction.request == {
        "method": "pca",
        "asked": "pca:6",
        "min_cosine": None,
        "sample_steps": reduce.sample_steps,
        "held_out_steps": reduce.held_out_steps,
    }


def test_a_version_1_provenance_reads_the_documented_defaults(tmp_path):
    build(tmp_path / "s")
    attrs = open_cache(tmp_path / "s").attrs
    old = json.loads(json.dumps(attrs))
    old["format_version"] = 1
    for gone in ("recipe", "selection"):
        del old[gone]
    for gone in ("mask", "checksum"):
        del old["targets"][gone]
    provenance = Provenance.from_attrs(old)
    assert (provenance.format_version, provenance.recipe, provenance.selection) == (1, "none", None)
    assert (provenance.targets.mask, provenance.targets.checksum, provenance.targets.has_mask) == (
        "none",
        "none",
        False,
    )
    assert provenance.to_attrs() == {**attrs, "format_version": 1}


# ----------------------------------------------------------------------------- keys


def test_episode_keys_and_tfds_ids():
    assert episode_key(7) == "episode_000007" and episode_key(np.int64(12), "suite") == "suite/episode_000012"
    shards = [["s", "f-0", 2], ["t", "g-0", 1], ["s", "f-1", 1]]
    assert tfds_ids(shards) == {
        "f-0__0": "s/episode_000000",
        "f-0__1": "s/episode_000001",
        "g-0__0": "t/episode_000000",
        "f-1__0": "s/episode_000002",
    }


def test_the_loader_api_imports_no_dataset_reader():
    """sfcache.torch needs the episode key rule, not the readers (pyarrow, PyAV, h5py cost seconds at import)."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, sfcache.torch; "
            "print(sorted(m for m in sys.modules if m.startswith(('sfcache.sources', 'pyarrow', 'av'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "[]"


# ----------------------------------------------------------------------------- messages


def test_store_errors_name_extraction_fields_and_sf_extract_prints_its_flags(tmp_path):
    """A library user reads ExtractConfig.overwrite (what to set), `sf extract` its flag."""
    build(tmp_path / "s")
    with lock_store(tmp_path / "s"), pytest.raises(StoreError) as raised:
        create(tmp_path / "s", make_config())
    overwrite = Field("ExtractConfig", "overwrite")
    assert str(raised.value).endswith(f": already holds a store; resume it, or create it again with {overwrite}")
    assert raised.value.message.fields == (overwrite,)
    mismatch = ConfigMismatch("S", {"dtype": ("float16", "int8")})
    named_as_flags(raised.value, ExtractConfig)
    named_as_flags(mismatch, ExtractConfig)
    assert str(raised.value).endswith("resume it, or create it again with --overwrite")
    assert str(mismatch).endswith("; use --overwrite to replace it, or another --out")


def test_store_messages_name_fields_extract_config_has():
    """The store names ExtractConfig's fields without importing it: each one it names must be there."""
    for field in [*ConfigMismatch.OVERWRITE.fields, OUT, OVERWRITE, *REPAIR.fields, RECIPE, PREPROCESS, VIEWS]:
        assert field_of(ExtractConfig, field.name) == field


def test_a_layer_not_stored_names_what_chooses_it(tmp_path):
    with lock_store(tmp_path / "s"):
        cache = create_store(tmp_path / "s", make_config(layers=(1, 3)))
    with pytest.raises(StoreError, match=r"stored layers: \[1, 3\] \(choose with layer=\)$"):
        cache.resolve_layer(2)  # a reader's argument
    cache_layer = Field("TrainConfig", "cache_layer")
    with pytest.raises(StoreError) as raised:
        cache.resolve_layer(2, cache_layer)
    assert str(raised.value).endswith("(choose with TrainConfig.cache_layer)")
    named_as_flags(raised.value, TrainConfig)
    assert str(raised.value).endswith("(choose with --cache-layer)")
