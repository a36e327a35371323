"""The benchmarks' presets (one list, checked by every area and entry point) and the loader's read bound."""

from __future__ import annotations

import importlib
import multiprocessing
import sys

import numpy as np
import pytest

import bench
import bench.cpu_cost
import bench.gpu
import bench.loader
import bench.run
import bench.train
from sfcache.errors import SfcacheError
from sfcache.store import open_cache
from sfcache.vggt.config import PRESETS as VGGT_CONFIGS

AREAS = {area: importlib.import_module(f"bench.{area}") for area in (*bench.run.AREAS, "cpu_cost", "gpu")}
ENTRIES = {
    **{area: module.run for area, module in AREAS.items() if hasattr(module, "run")},
    "cpu_cost": lambda workdir, preset: bench.cpu_cost.cpu_cost_rows(workdir, preset, 4, "cpu"),
    "gpu": lambda workdir, preset: bench.gpu.run(workdir, preset, device="cpu"),
}
MODEL_AREAS = ("vggt", "extract", "compact", "train", "gpu")


def test_every_area_has_exactly_the_preset_list_with_the_same_settings_in_each():
    for area, module in AREAS.items():
        assert tuple(module.PRESETS) == bench.PRESETS, area
        assert set(module.PRESETS["tiny"]) == set(module.PRESETS["vggt-1b"]), area


@pytest.mark.parametrize("area", sorted(ENTRIES))
def test_every_area_refuses_an_unknown_preset_before_any_work(area, tmp_path):
    with pytest.raises(SfcacheError, match=f"bench {area}: unknown preset 'full'.*expected one of tiny, vggt-1b"):
        ENTRIES[area](tmp_path, "full")
    assert not any(tmp_path.iterdir())  # nothing written, no model loaded


@pytest.mark.parametrize(
    "entry, argv",
    [
        (bench.run.main, ["bench.run", "--preset", "full"]),
        (bench.run.main, ["bench.run"]),
        (bench.gpu.main, ["bench.gpu", "--preset", "full"]),
    ],
)
def test_entry_points_stop_with_a_usage_error_on_an_unknown_preset(entry, argv, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_PRESET", "full")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        entry()
    assert stopped.value.code == 2 and "'full'" in capsys.readouterr().err


def test_vggt_1b_runs_the_real_architecture_and_more_work_than_tiny():
    for area in MODEL_AREAS:
        tiny, real = (AREAS[area].PRESETS[preset]["weights"] for preset in ("tiny", "vggt-1b"))
        assert (tiny, real) == ("random:tiny", "random:vggt-1b"), area
    assert VGGT_CONFIGS["vggt-1b"].out_channels == 2048 and VGGT_CONFIGS["vggt-1b"].img_size == 518
    assert bench.cpu_cost.PRESETS["tiny"]["forward"] is None  # tiny: a GPU's 10 ms per step
    assert bench.cpu_cost.PRESETS["vggt-1b"]["forward"] == "random:vggt-1b"  # vggt-1b: the forward, timed
    for area, module in AREAS.items():  # every count the presets set is at least as large for vggt-1b
        tiny, real = module.PRESETS["tiny"], module.PRESETS["vggt-1b"]
        counts = [key for key, value in tiny.items() if isinstance(value, int)]
        assert all(real[key] >= tiny[key] for key in counts), area
        assert any(real[key] > tiny[key] for key in counts), area


def _rows_bytes(store, rows: list[int]) -> bytes:
    """The stored bytes of `rows` read through the plain file ranges of the loader bound."""
    ranges = bench.loader.byte_ranges(store, 23, sorted(rows))
    parts = []
    for file, offset, length in ranges:
        with open(file, "rb") as f:
            f.seek(offset)
            parts.append(f.read(length))
    return b"".join(parts)


def test_loader_bound_ranges_hold_exactly_the_stored_bytes_of_the_rows(tmp_path):
    store = bench.loader.loader_store(tmp_path / "store", 128, 8)
    rows = [33, 0, 1, 2, 5, 5, 31, 32, 127, 64]  # runs, a repeat, shard ends and starts, the last row
    ranges = bench.loader.byte_ranges(store, 23, sorted(rows))
    assert len(ranges) == 7  # [0, 3), [5], [5], [31], [32, 34), [64], [127]: 31 and 32 are two shards
    stored = open_cache(store).read_rows(sorted(rows), decoded=False)
    assert _rows_bytes(store, rows) == np.ascontiguousarray(stored).tobytes()
    assert sum(length for _, _, length in ranges) == len(rows) * stored[0].nbytes


@pytest.mark.own_process  # forks the reader processes
def test_loader_bound_and_zarr_readers_move_every_byte_in_parallel_processes(tmp_path):
    store = bench.loader.loader_store(tmp_path / "store", 128, 8)
    halves = np.array_split(np.sort([*range(128), *range(0, 128, 3)]), 2)
    ranges = [bench.loader.byte_ranges(store, 23, half.tolist()) for half in halves]
    stored = sum(length for part in ranges for _, _, length in part)
    assert stored == (128 + 43) * 2 * 256 * 8 * 2
    context = multiprocessing.get_context()
    assert bench.loader._parallel_seconds(bench.loader._read_ranges, ranges, stored, context) > 0
    assert (
        bench.loader._parallel_seconds(bench.loader._read_rows, [(store, 23, half) for half in halves], stored, context)
        > 0
    )
    with pytest.raises(RuntimeError, match="moved .* bytes, expected"):
        bench.loader._parallel_seconds(bench.loader._read_ranges, ranges, stored + 1, context)
