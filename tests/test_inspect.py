"""`sf inspect-cache` and sfcache.inspection on real stores extracted from a fixture dataset with random tiny VGGT."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from sfcache import inspection
from sfcache.cli.main import app, main
from sfcache.errors import StoreError, WeightsError
from sfcache.extract import ExtractConfig, extract
from sfcache.inspection import pictures
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import StoreConfig, create_store, lock_store, open_cache, read_attrs

FRAME = 64  # fixture frame size (LIBERO HDF5, two views)
GRID = (4, 4)
STEPS_PER_SHARD = 2
LAYER = 3  # the last layer of the tiny preset (-1)
CHANNELS = 256  # 2 * tiny embed_dim


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One dataset (2 episodes x 4 steps) and the store extracted from it; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("inspect")
    written = write_libero_hdf5(root / "data", tasks=1, demos=2, steps=4, size=FRAME)
    store = root / "store"
    extract(
        ExtractConfig(
            source=written.path,
            out=store,
            vggt="random:tiny",
            layers=(-1,),
            grid=GRID,
            steps_per_shard=STEPS_PER_SHARD,
            batch_size=4,
            device="cpu",
        ),
        progress=False,
    )
    return written, store


@pytest.fixture
def damaged(built, tmp_path) -> Path:
    """A private copy of the built store, free to corrupt."""
    copy = tmp_path / "store"
    shutil.copytree(built[1], copy)
    return copy


def invoke(*args: str):
    return CliRunner().invoke(app, ["inspect-cache", *map(str, args)])


def shard_file(store: Path, shard: int) -> Path:
    return store / f"targets/layer_{LAYER}/c/{shard}/0/0/0"


def failures_of(result: inspection.CheckResult) -> str:
    return "\n".join(f"{f.where}: {f.what}" for f in result.failures)


# ----------------------------------------------------------------------------- summary


def test_summary_figures_match_an_independent_count(built):
    written, store = built
    summary = inspection.summarize(inspection.open_store(store))
    lengths = [len(episode.frames) for episode in written.episodes.values()]
    on_disk = sum(os.path.getsize(Path(d) / f) for d, _, files in os.walk(store) for f in files)
    raw_per_step = 2 * GRID[0] * GRID[1] * CHANNELS * 2  # views x tokens x channels x float16
    assert summary.episodes == len(written.episodes) == 2
    assert summary.steps == sum(lengths) == 8
    assert summary.views == ("primary", "wrist")
    assert (summary.layers, summary.grid, summary.channels) == ((LAYER,), tuple(GRID), CHANNELS)
    assert (summary.dtype, summary.codec) == ("float16", "none")
    assert summary.source["format"] == "libero_hdf5"
    assert summary.source["path"] == str(written.path.resolve())
    assert summary.bytes_on_disk == on_disk
    assert summary.raw_bytes_per_step == raw_per_step
    assert summary.bytes_per_step == pytest.approx(on_disk / 8)
    assert summary.compression_ratio == pytest.approx(raw_per_step * 8 / on_disk)
    assert (summary.shards_done, summary.shards, summary.steps_done) == (4, 4, 8)
    assert summary.complete and summary.missing_episodes == ()
    assert summary.vggt.weights_id == "random:tiny+seed0" and summary.vggt.random_weights
    assert any("RANDOM WEIGHTS" in warning for warning in summary.warnings)


def test_cli_summary_text_and_json(built):
    _, store = built
    text = invoke(store)
    assert text.exit_code == 0, text.output
    for expected in (
        "RANDOM WEIGHTS",
        "libero_hdf5",
        "primary, wrist",
        "float16 / none",
        "4/4 shards, 8/8 steps",
        "random:tiny+seed0",
        "none (VGGT input per preprocess)",  # raw-pixel HDF5: no JPEG decoded, so no DCT shown
        "none (uncompressed)",  # not "0.997x": the ratio of an uncompressed store means nothing
    ):
        assert expected in text.output
    assert "JPEG" not in text.output and inspection.summarize(inspection.open_store(store)).recipe.jpeg_dct is None
    as_json = invoke(store, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["summary"] == inspection.summarize(inspection.open_store(store)).to_json()


def test_incomplete_store_lists_missing_episodes(damaged):
    zarr.open_array(str(damaged / "done"), mode="r+")[3] = 0  # rows 6-7: the second episode's end
    summary = inspection.summarize(inspection.open_store(damaged))
    episodes = [e[0] for e in read_attrs(damaged)["episodes"]]
    assert not summary.complete
    assert (summary.shards_done, summary.steps_done) == (3, 6)
    assert summary.missing_episodes == (episodes[1],)
    result = invoke(damaged)
    assert "missing episodes" in result.output and "3/4 shards, 6/8 steps" in result.output


# ----------------------------------------------------------------------------- one episode


def test_episode_norms_per_step_and_view(built):
    written, store = built
    key = list(written.episodes)[1]
    report = inspection.episode_report(inspection.open_store(store), key)
    stored = zarr.open_array(str(store / f"targets/layer_{LAYER}"), mode="r")[4:8].astype(np.float32)
    norms = np.linalg.norm(stored, axis=-1)  # [steps, views, tokens]
    assert (report.key, report.start, report.length) == (key, 4, 4)
    assert report.instruction == written.episodes[key].instruction
    assert [s.step for s in report.steps] == [0, 1, 2, 3]
    np.testing.assert_allclose([s.mean_norm for s in report.steps], norms.mean(-1), rtol=1e-5)
    np.testing.assert_allclose([s.min_norm for s in report.steps], norms.min(-1), rtol=1e-5)
    np.testing.assert_allclose(report.max_norm, norms.max(axis=(0, 2)), rtol=1e-5)
    result = invoke(store, "--episode", key)
    assert result.exit_code == 0 and "token L2 norm per step" in result.output


def test_unknown_episode_is_a_clear_error(built):
    result = invoke(built[1], "--episode", "no/such/demo_9")
    assert isinstance(result.exception, StoreError) and "no/such/demo_9" in str(result.exception)


# ----------------------------------------------------------------------------- --check


def test_check_passes_on_a_good_store(built):
    result = inspection.check(built[1])
    assert result == inspection.CheckResult(ok=True, failures=(), shards_checked=4, shards=4)
    cli = invoke(built[1], "--check")
    assert cli.exit_code == 0 and "check: OK" in cli.output


def test_check_catches_overwritten_shard_bytes(damaged):
    file = shard_file(damaged, 1)
    data = bytearray(file.read_bytes())
    data[-40:] = bytes(range(40))  # the shard index and its checksum
    file.write_bytes(bytes(data))
    result = inspection.check(damaged)
    assert not result.ok
    assert [f.where for f in result.failures] == [str(file)]
    assert "shard 1 unreadable" in result.failures[0].what
    cli = invoke(damaged, "--check", "--json")
    assert cli.exit_code == 1
    assert json.loads(cli.output)["check"]["failures"] == result.to_json()["failures"]


def test_check_catches_nan_and_names_the_step(damaged, built):
    array = zarr.open_array(str(damaged / f"targets/layer_{LAYER}"), mode="r+")
    step = array[5]
    step[1, 3, 7] = np.nan
    array[5] = step
    result = inspection.check(damaged)
    key = list(built[0].episodes)[1]
    assert not result.ok and len(result.failures) == 1
    failure = result.failures[0]
    assert failure.where == f"targets/layer_{LAYER} shard 2"
    assert f"episode {key} step 1 view wrist token 3" in failure.what and "1 non-finite" in failure.what


def test_check_catches_missing_episode_and_deleted_shard(damaged, built):
    keys = list(built[0].episodes)
    zarr.open_array(str(damaged / "done"), mode="r+")[0] = 0  # done flag cleared
    shard_file(damaged, 3).unlink()  # flag set, data gone
    result = inspection.check(damaged)
    text = failures_of(result)
    assert not result.ok and len(result.failures) == 2
    assert f"{shard_file(damaged, 3)}: shard 3 is marked done but its file is missing" in text
    assert f"done: shards 0 not done: 1 episode(s) incomplete ({keys[0]})" in text
    zarr.open_array(str(damaged / "done"), mode="r+")[1:3] = 0  # shards 0-2: both episodes
    assert f"shards 0-2 not done: 2 episode(s) incomplete ({keys[0]}, {keys[1]})" in failures_of(
        inspection.check(damaged)
    )
    cli = invoke(damaged, "--check")
    assert cli.exit_code == 1 and "check: FAILED" in cli.output


def test_check_catches_inconsistent_index_and_provenance(damaged):
    meta = damaged / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["sfcache"]["episodes"][1][2] = 5  # second episode should start at row 4
    meta.write_text(json.dumps(doc))
    text = failures_of(inspection.check(damaged))
    assert "starts at row 5, expected 4" in text and "episodes add up to 9 rows, num_steps says 8" in text

    del doc["attributes"]["sfcache"]["vggt"]["weights_id"]
    meta.write_text(json.dumps(doc))
    result = inspection.check(damaged)
    lacks = (
        f"{meta}: attributes.sfcache.vggt.weights_id is missing, expected present (every complete "
        "`sf extract` records it); the store is damaged: delete it and run `sf extract` again"
    )
    assert failures_of(result) == f"{meta}: {lacks}"
    cli = invoke(damaged, "--check")  # the summary cannot open it: check says why
    assert cli.exit_code == 1 and "vggt.weights_id" in cli.output
    with pytest.raises(StoreError) as refused:
        inspection.open_store(damaged)
    assert str(refused.value) == lacks
    assert open_cache(damaged).provenance.vggt.weights_id is None  # a library reader needs no weights id


def _set(dotted: str, value):
    """Damage attrs["sfcache"] at a dotted path ("vggt.config"); value DELETE removes the field."""

    def change(attrs: dict) -> None:
        *parents, last = dotted.split(".")
        for part in parents:
            attrs = attrs[part]
        attrs.pop(last) if value is DELETE else attrs.__setitem__(last, value)

    return change


DELETE = object()
PROVENANCE_DAMAGE = [  # (field, value, what the message says it holds, what it expected)
    ("vggt", "x", '"x"', "an object (weights, weights_id, config, preprocess, compute_dtype)"),
    ("vggt.config", "x", '"x"', "an object of VGGTConfig fields"),
    ("vggt.config", [1, 2], "[1, 2]", "an object of VGGTConfig fields"),
    ("vggt.compute_dtype", 16, "16", "a string or null"),
    ("source", ["libero"], '["libero"]', "an object (the source's describe())"),
    ("targets.native_grid", [16], "[16]", "null or [height, width] of positive integers"),
    ("targets.native_grid", "16x16", '"16x16"', "null or [height, width] of positive integers"),
    (
        "targets.reduce",
        "pca:auto",
        '"pca:auto"',
        "null or an object (method, asked, min_cosine, sample_steps, held_out_steps)",
    ),
    (
        "targets.reduce",
        {"method": "pca", "asked": "pca:auto", "min_cosine": 0.99, "sample_steps": "9", "held_out_steps": 1},
        '"9"',
        "an integer >= 0",
    ),
    ("vggt.config", DELETE, "missing", "present (every complete `sf extract` records it)"),
    ("source.path", DELETE, "missing", "present (every complete `sf extract` records it)"),
]


@pytest.mark.parametrize(
    "field, value, held, expected",
    PROVENANCE_DAMAGE,
    ids=[f"{f}={'deleted' if v is DELETE else v}" for f, v, *_ in PROVENANCE_DAMAGE],
)
def test_damaged_provenance_is_one_store_error_naming_the_field(damaged, capsys, field, value, held, expected):
    meta = damaged / "zarr.json"
    document = json.loads(meta.read_text())
    _set(field, value)(document["attributes"]["sfcache"])
    meta.write_text(json.dumps(document))
    named = field + (".sample_steps" if isinstance(value, dict) else "")
    line = (
        f"{meta}: attributes.sfcache.{named} is {held}, expected {expected}; the store is damaged: "
        "delete it and run `sf extract` again"
    )
    with pytest.raises(StoreError) as refused:
        inspection.open_store(damaged)
    assert str(refused.value) == line
    if value is not DELETE:  # wrong types: every reader refuses
        with pytest.raises(StoreError, match="^" + line.replace("[", r"\[").replace("(", r"\(")[:60]):
            open_cache(damaged)
    assert failures_of(inspection.check(damaged)) == f"{meta}: {line}"
    with pytest.raises(SystemExit) as exited:
        main(["inspect-cache", str(damaged)])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err == f"error: {line}"
    with pytest.raises(SystemExit) as exited:
        main(["inspect-cache", str(damaged), "--check"])
    printed = capsys.readouterr()
    assert exited.value.code == 1 and "Traceback" not in printed.out + printed.err
    assert f"attributes.sfcache.{named}" in "".join((printed.out + printed.err).split())  # rich wraps the line


def test_check_reports_a_lock_left_behind(damaged):
    (damaged / ".sfcache.lock").write_text('{"pid": 1, "host": "elsewhere", "started": 0}')
    assert "left locked by an extractor that stopped mid-run" in failures_of(inspection.check(damaged))
    assert any("stopped mid-run" in w for w in inspection.summarize(inspection.open_store(damaged)).warnings)


def test_check_tells_a_live_extractor_from_a_leftover_lock(damaged):
    from sfcache.store import lock_store

    with lock_store(damaged):  # held with flock, as a running extractor
        assert "an extractor is writing it now" in failures_of(inspection.check(damaged))


# ----------------------------------------------------------------------------- --verify


def test_verify_passes_on_a_good_store(built):
    cache = inspection.open_store(built[1])
    result = inspection.verify(cache, steps=2, seed=3)
    assert result.ok and result.min_cos > 0.9999 and result.threshold == 0.999
    assert len(result.steps) == 2 and not result.source_changed
    rows = np.sort(np.random.default_rng(3).choice(8, size=2, replace=False))  # seeded, reproducible
    keys = list(built[0].episodes)
    assert result.steps == tuple((keys[row // 4], row % 4) for row in rows)
    assert inspection.verify(cache, steps=1, seed=3, threshold=1.01).ok is False
    as_device = inspection.verify(cache, steps=2, seed=3, device=torch.device("cpu"))  # what the CLI passes
    assert as_device == result and as_device.device == "cpu"


def test_verify_fails_on_altered_values(damaged, built):
    array = zarr.open_array(str(damaged / f"targets/layer_{LAYER}"), mode="r+")
    array[:] = array[:][:, :, ::-1]  # tokens in the wrong order
    result = invoke(damaged, "--verify", "2", "--json")
    assert result.exit_code == 1
    verified = json.loads(result.output)["verify"]
    assert not verified["ok"] and verified["min_cos"] < 0.9
    assert verified["layers"][str(LAYER)]["worst"]["episode"] in built[0].episodes


def test_verify_refuses_other_weights(built, capsys):
    result = invoke(built[1], "--verify", "1", "--vggt", "random:tiny@1")
    assert isinstance(result.exception, WeightsError)
    assert "random:tiny+seed1" in str(result.exception) and "random:tiny+seed0" in str(result.exception)
    with pytest.raises(SystemExit) as exit_info:  # `sf` prints one line, no traceback
        main(["inspect-cache", str(built[1]), "--verify", "1", "--vggt", "random:tiny@1"])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- --pca


def test_pca_png_size_and_tiles(built, tmp_path):
    written, store = built
    out = tmp_path / "pca" / "picture.png"
    result = invoke(store, "--pca", out, "--pca-steps", "3", "--json")
    assert result.exit_code == 0, result.output
    picture = json.loads(result.output)["pca"]
    image = np.asarray(Image.open(out))
    assert Image.open(out).format == "PNG"
    keys = list(written.episodes)
    assert picture["steps"] == [[keys[0], 0], [keys[1], 0], [keys[1], 3]]  # evenly over rows 0, 4, 7
    tasks = list(dict.fromkeys(key.rpartition("/")[0] for key in keys[:2]))
    assert (picture["width"], picture["height"]) == inspection.pca_picture_size((FRAME, FRAME), 2, 3, tasks)
    band = inspection.label_band(4 * FRAME, tasks)
    lines = len(pictures._wrap(pictures.CAPTION, 4 * FRAME))  # what "PCA L3" and the colours mean
    lines += sum(len(pictures._wrap(f"task {n}: {task}", 4 * FRAME)) for n, task in enumerate(tasks, 1))
    assert band == (2 + lines) * pictures.LINE + 4 and lines >= 4
    assert image.shape == (band + 3 * FRAME, 4 * FRAME, 3)
    assert image[:band].max() > 0 and image[:band].min() == 0  # the column labels, written
    first = written.episodes[keys[0]].frames[0]  # [views, H, W, 3]
    below = 16  # rows under the step label
    row = image[band + below : band + FRAME]
    np.testing.assert_array_equal(row[:, :FRAME], first[0][below:])  # frames as the policy sees them
    np.testing.assert_array_equal(row[:, 2 * FRAME : 3 * FRAME], first[1][below:])
    tokens = inspection.open_store(store).read_rows([0, 4, 7])
    colours = inspection.pca_rgb(tokens).reshape(3, 2, *GRID, 3)
    cell = FRAME // GRID[0]
    np.testing.assert_array_equal(row[:, FRAME : 2 * FRAME], colours[0, 0].repeat(cell, 0).repeat(cell, 1)[below:])
    assert (image[band + 2 : band + 12, :FRAME] != first[0][2:12]).any()  # the step label, written


def test_pca_rgb_orders_components_and_is_deterministic():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((32, 3)))[0].T  # 3 orthonormal directions in 32-d
    strengths = rng.standard_normal((500, 3)) * np.array([10.0, 3.0, 1.0])
    tokens = (strengths @ basis + 0.01 * rng.standard_normal((500, 32))).reshape(20, 25, 32)
    colours = inspection.pca_rgb(tokens)
    assert colours.shape == (20, 25, 3) and colours.dtype == np.uint8
    for channel in range(3):
        correlation = np.corrcoef(colours.reshape(-1, 3)[:, channel], strengths[:, channel])[0, 1]
        assert abs(correlation) > 0.95
    np.testing.assert_array_equal(inspection.pca_rgb(tokens), colours)
    assert not inspection.pca_rgb(np.ones((4, 8))).any()  # no variance: one colour, no NaN


def test_pca_of_an_unextracted_episode_is_refused(damaged, built):
    key = list(built[0].episodes)[0]
    zarr.open_array(str(damaged / "done"), mode="r+")[1] = 0
    with pytest.raises(StoreError, match="not fully extracted"):
        inspection.pca_picture(inspection.open_store(damaged), damaged / "x.png", episode=key)


# ----------------------------------------------------------------------------- int8 stores


def rewrite(built_store: Path, store: Path, **options) -> Path:
    """The built store's values written again through the store's writer with other StoreConfig options."""
    source = inspection.open_store(built_store)
    provenance, targets = source.provenance, source.provenance.targets
    config = StoreConfig(
        episodes=provenance.episodes,
        layers=(LAYER,),
        grid=GRID,
        native_grid=targets.native_grid,
        aspect_ratio=targets.aspect_ratio,
        views=targets.views,
        channels=CHANNELS,
        vggt=provenance.vggt.to_attrs(),
        source=provenance.source,
        steps_per_shard=STEPS_PER_SHARD,
        **options,
    )
    with lock_store(store):
        cache = create_store(store, config)
        for shard in range(cache.num_shards):
            cache.write_shard(shard, {LAYER: source.read_rows(cache.shard_rows(shard))})
    return store


@pytest.mark.parametrize("checksum", [True, False])
def test_a_flipped_data_byte_is_caught_by_check_with_or_without_checksums(built, tmp_path, checksum):
    store = rewrite(built[1], tmp_path / "store", checksum=checksum)
    assert inspection.summarize(inspection.open_store(store)).checksum == ("crc32c" if checksum else "none")
    assert np.array_equal(
        inspection.open_store(store).read_rows(slice(0, 8)), inspection.open_store(built[1]).read_rows(slice(0, 8))
    )
    file = shard_file(store, 1)
    data = bytearray(file.read_bytes())
    data[100] ^= 0x01  # inside step 2's values, not the index
    file.write_bytes(bytes(data))
    result = inspection.check(store)
    assert not result.ok and len(result.failures) == 1
    if checksum:  # the step's CRC32C fails its decode
        assert result.failures[0].where == str(file) and "shard 1 unreadable" in result.failures[0].what
    else:  # it decodes to an ordinary (wrong) number: the digest recorded when the shard was written differs
        assert result.failures[0].where == "shard 1"
        assert f"{file}: shard 1 does not match the digest recorded when it was written" in result.failures[0].what


def test_int8_store_verifies_at_its_threshold_and_nan_scales_are_caught(built, tmp_path):
    """The float16 store re-encoded as int8 through the store's writer: same values, int8 rounding."""
    store = rewrite(built[1], tmp_path / "int8", dtype="int8")
    summary = inspection.summarize(inspection.open_store(store))
    tokens = GRID[0] * GRID[1]
    assert summary.raw_bytes_per_step == 2 * tokens * CHANNELS + 2 * tokens * (CHANNELS // 128) * 4
    assert inspection.check(store).ok
    result = inspection.verify(inspection.open_store(store), steps=1, seed=0)
    assert result.threshold == inspection.DEFAULT_THRESHOLDS["int8"] == 0.995
    assert result.ok and 0.995 < result.min_cos < 1.0

    scales = zarr.open_array(str(store / f"targets/layer_{LAYER}_scale"), mode="r+")
    step = scales[6]
    step[0, 9] = np.inf
    scales[6] = step
    failure = failures_of(inspection.check(store))
    assert f"targets/layer_{LAYER} shard 3: " in failure and "step 2 view primary" in failure
