"""Round trips through every dataset format: what the writers put on disk is what the readers return."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from sfcache.cli.main import app
from sfcache.errors import SfcacheError, SourceError
from sfcache.sources import FORMATS, EpisodeInfo, Steps, open_source
from sfcache.sources import synthetic as syn
from sfcache.sources.base import natural_key
from sfcache.sources.images import decode_image, opencv_channel_order
from tests.test_sources_bad_input import PARAMS as BAD_INPUT

WRITERS = {
    "libero_hdf5": lambda root: syn.write_libero_hdf5(root, steps=6, size=48),
    "libero_hdf5_no_noops": lambda root: syn.write_libero_hdf5(
        root, suite="libero_10", no_noops=True, steps=5, size=40
    ),
    "libero_rlds": lambda root: syn.write_libero_rlds(root, episodes=3, steps=5, size=64, shards=2),
    "lerobot": lambda root: syn.write_lerobot(root, episodes=3, steps=5, size=48),
    "lerobot_v3": lambda root: syn.write_lerobot(root, episodes=3, steps=5, size=48, version="v3.0"),
    "robotwin_legacy": lambda root: syn.write_robotwin(root, steps=4, height=48, width=64),
    "robotwin_xpolicylab": lambda root: syn.write_robotwin(root, layout="xpolicylab", steps=4, height=48, width=64),
    "robotwin_xpolicylab_unmarked": lambda root: syn.write_robotwin(
        root, layout="xpolicylab", xpl_marker=False, steps=4, height=48, width=64
    ),
}
JPEG_TOLERANCE = 6.0  # mean absolute error of a JPEG round trip of the small rendered scenes
WRONG_FRAMES = 25.0  # the same frames rotated or with channels swapped are at least this far


@pytest.fixture(scope="module", params=sorted(WRITERS))
def written(request, tmp_path_factory) -> syn.Written:
    return WRITERS[request.param](tmp_path_factory.mktemp(request.param))


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_frames(got: np.ndarray, expected: np.ndarray, lossy: bool) -> None:
    """Exact for raw/PNG; for JPEG within tolerance and far from the rotated or channel-swapped frames."""
    assert got.dtype == np.uint8 and got.shape == expected.shape
    if not lossy:
        np.testing.assert_array_equal(got, expected)
        return
    assert mean_error(got, expected) < JPEG_TOLERANCE
    assert mean_error(got, expected[:, :, ::-1, ::-1]) > WRONG_FRAMES
    assert mean_error(got, expected[..., ::-1]) > WRONG_FRAMES


def test_round_trip(written: syn.Written):
    source = open_source(written.path)
    assert source.format == written.format
    episodes = source.episodes()
    assert [info.key for info in episodes] == sorted(written.episodes, key=natural_key)
    for info in episodes:
        expected = written.episodes[info.key]
        assert info == EpisodeInfo(info.key, expected.instruction, len(expected.actions))
        steps = source.read(info.key)
        assert isinstance(steps, Steps)
        assert_frames(steps.frames, expected.frames[:, : len(source.views)], written.lossy)
        assert steps.actions.dtype == np.float32 and steps.proprio.dtype == np.float32
        np.testing.assert_allclose(steps.actions, expected.actions, rtol=1e-6)
        np.testing.assert_allclose(steps.proprio, expected.proprio, rtol=1e-6)


def test_step_ranges_match_full_read(written: syn.Written):
    source = open_source(written.path)
    info = source.episodes()[-1]
    full = source.read(info.key)
    for start, stop in [(0, 1), (1, info.num_steps - 1), (info.num_steps - 1, info.num_steps)]:
        part = source.read(info.key, start, stop)
        np.testing.assert_array_equal(part.frames, full.frames[start:stop])
        np.testing.assert_array_equal(part.actions, full.actions[start:stop])
        np.testing.assert_array_equal(part.proprio, full.proprio[start:stop])
    with pytest.raises(SourceError, match=r"step range \[2, 1\)"):
        source.read(info.key, 2, 1)
    with pytest.raises(SourceError, match="no such episode"):
        source.read("not/an/episode")


def test_frame_free_read_returns_the_same_vectors_without_decoding(written: syn.Written, monkeypatch):
    source = open_source(written.path)
    info = source.episodes()[-1]
    full = source.read(info.key)
    start, stop = 1, info.num_steps
    monkeypatch.setattr(type(source), "_read_frames", lambda *args: pytest.fail("frames were decoded"))
    vectors = source.read(info.key, start, stop, frames=False)
    assert vectors.frames is None
    assert vectors.actions.dtype == np.float32 and vectors.proprio.dtype == np.float32
    np.testing.assert_array_equal(vectors.actions, full.actions[start:stop])
    np.testing.assert_array_equal(vectors.proprio, full.proprio[start:stop])
    np.testing.assert_allclose(vectors.actions, written.episodes[info.key].actions[start:stop], rtol=1e-6)
    with pytest.raises(SourceError, match=r"step range \[0, 99\)"):
        source.read(info.key, 0, 99, frames=False)


def test_pickled_source_reads_the_same(written: syn.Written):
    source = open_source(written.path)
    key = source.episodes()[0].key
    before = source.read(key, 0, 2)  # opens (and caches) handles in this process
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.read(key, 0, 2).frames, before.frames)
    assert clone.episodes() == source.episodes()


def test_describe_records_provenance(written: syn.Written):
    source = open_source(written.path)
    description = source.describe()
    assert description["format"] == written.format
    assert description["path"] == str(written.path.resolve())
    assert description["views"] == list(source.views)
    assert description["rotate"] is (written.format == "libero_hdf5")
    assert description["fingerprint"].startswith("sha256:") and len(description["fingerprint"]) == 71
    assert open_source(written.path).describe() == description


def _read_first(source, key):
    return source.read(key, 0, 1).frames


def test_sources_work_from_worker_processes(tmp_path):
    written = syn.write_robotwin(tmp_path, steps=3, height=32, width=48)
    source = open_source(written.path)
    keys = [info.key for info in source.episodes()]
    source.read(keys[0], 0, 1)  # a handle is open in the parent before forking
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.starmap(_read_first, [(source, key) for key in keys])
    for key, frames in zip(keys, results):
        np.testing.assert_array_equal(frames, source.read(key, 0, 1).frames)


# --- format specifics ------------------------------------------------------------------------------------


def test_libero_hdf5_orientation_and_rotate_flag(tmp_path):
    written = syn.write_libero_hdf5(tmp_path, tasks=1, demos=1, steps=3, size=32)
    key, expected = next(iter(written.episodes.items()))
    policy_view = open_source(written.path).read(key).frames
    np.testing.assert_array_equal(policy_view, expected.frames)
    stored = open_source(written.path, rotate=False)
    np.testing.assert_array_equal(stored.read(key).frames, expected.frames[:, :, ::-1, ::-1])
    assert stored.describe()["rotate"] is False
    # the rendered marker sits top-left in the policy view, so an unrotated frame is really different
    assert mean_error(policy_view, stored.read(key).frames) > WRONG_FRAMES


def test_libero_hdf5_depth_is_turned_and_ordered_like_the_frames(tmp_path):
    written = syn.write_libero_hdf5(tmp_path, tasks=1, demos=1, steps=4, size=24, depth=True)
    key, expected = next(iter(written.episodes.items()))
    steps = open_source(written.path).read(key, 1, 3, depth=True)
    assert steps.depth.dtype == np.float32 and steps.depth.shape == (2, 2, 24, 24)
    np.testing.assert_array_equal(steps.depth, expected.depth[1:3])
    assert steps.depth[:, 0].min() > 0.5 and steps.depth[:, 1].max() < 0.2  # agentview metres, wrist near
    # the far wall (3 m) is the top of the policy view, as the sky is in the frames
    assert steps.depth[0, 0, 0].mean() == pytest.approx(3.0, abs=0.01) and steps.depth[0, 0, -1].mean() < 1.5
    swapped = open_source(written.path, views=("wrist", "primary")).read(key, 1, 3, depth=True)
    np.testing.assert_array_equal(swapped.depth, expected.depth[1:3, ::-1])
    unturned = open_source(written.path, rotate=False).read(key, 1, 3, depth=True)
    np.testing.assert_array_equal(unturned.depth, expected.depth[1:3, :, ::-1, ::-1])
    assert open_source(written.path).read(key, 1, 3).depth is None  # not read unless asked


def test_missing_depth_is_one_line_naming_the_file_and_key(tmp_path):
    plain = syn.write_libero_hdf5(tmp_path / "plain", tasks=1, demos=1, steps=3, size=16)
    key = next(iter(plain.episodes))
    with pytest.raises(SourceError) as error:
        open_source(plain.path).read(key, depth=True)
    assert str(error.value) == (
        f"{plain.files[0]}, episode {key}: has no obs/agentview_depth: "
        "record it with `sf collect-libero --depth` or `sf render-depth`"
    )
    with_depth = syn.write_libero_hdf5(tmp_path / "depth", tasks=1, demos=1, steps=3, size=16, depth=True)
    with h5py.File(with_depth.files[0], "a") as h5:
        del h5["data/demo_0/obs/eye_in_hand_depth"]
        h5["data/demo_0/obs/eye_in_hand_depth"] = np.ones((3, 8, 8), np.float16)
    wrong_size = r"obs/eye_in_hand_depth'.*shape \(3, 8, 8\), expected float array \[3, 16, 16\]"
    with pytest.raises(SourceError, match=wrong_size):
        open_source(with_depth.path).read(key, depth=True)
    lerobot = syn.write_lerobot(tmp_path / "lerobot", episodes=1, steps=2, size=16)
    source = open_source(lerobot.path)
    with pytest.raises(SourceError, match="the lerobot format records no depth"):
        source.read(source.episodes()[0].key, depth=True)


def test_libero_hdf5_variants(tmp_path):
    original = syn.write_libero_hdf5(tmp_path / "o", suite="libero_10", tasks=2, demos=2, steps=3, size=32)
    no_noops = syn.write_libero_hdf5(
        tmp_path / "n", suite="libero_10", tasks=2, demos=3, steps=3, size=32, no_noops=True
    )
    assert open_source(original.path).describe()["variant"] == "original"
    source = open_source(no_noops.path)
    assert source.describe()["variant"] == "no_noops"
    keys = [info.key for info in source.episodes()]
    assert keys[:3] == [
        "libero_10_no_noops/KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it/demo_0",
        "libero_10_no_noops/KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it/demo_3",
        "libero_10_no_noops/KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it/demo_4",
    ]
    assert source.episodes()[0].instruction == "turn on the stove and put the moka pot on it"
    # the original keeps its instruction in problem_info, whatever the file is called
    file = original.files[0]
    file.rename(file.with_name("renamed_demo.hdf5"))
    renamed = open_source(original.path).episodes()[-1]
    assert renamed.key == "libero_10/renamed/demo_1"
    assert renamed.instruction == "put both the alphabet soup and the tomato sauce in the basket"


def test_libero_hdf5_natural_demo_order(tmp_path):
    written = syn.write_libero_hdf5(tmp_path, tasks=1, demos=11, steps=2, size=16)
    keys = [info.key.rsplit("/", 1)[1] for info in open_source(written.path).episodes()]
    assert keys == [f"demo_{i}" for i in range(11)]


def test_libero_rlds_layout(tmp_path):
    ten = syn.write_libero_rlds(tmp_path, suite="libero_10", episodes=3, steps=3, size=32, shards=2)
    spatial = syn.write_libero_rlds(tmp_path, suite="libero_spatial", episodes=2, steps=3, size=32, shards=1)
    assert sorted(p.name for p in (ten.path / "1.0.0").iterdir())[-2:] == [
        "liber_o10-train.tfrecord-00000-of-00002",
        "liber_o10-train.tfrecord-00001-of-00002",
    ]
    info = json.loads((ten.path / "1.0.0" / "dataset_info.json").read_text())
    assert info["splits"][0]["shardLengths"] == ["2", "1"]
    both = open_source(tmp_path)  # a folder holding several TFDS datasets
    assert both.format == "libero_rlds"
    assert [i.key for i in both.episodes()] == sorted([*ten.episodes, *spatial.episodes])
    assert open_source(ten.path / "1.0.0").episodes() == open_source(ten.path).episodes()


def test_libero_rlds_reads_one_record_only(tmp_path):
    written = syn.write_libero_rlds(tmp_path, episodes=2, steps=3, size=32, shards=1)
    source = open_source(written.path)
    first, second = source.episodes()
    shard = written.files[0]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # corrupt the second (last) record after indexing
    shard.write_bytes(bytes(data))
    assert source.read(first.key).frames.shape[0] == 3
    with pytest.raises(SourceError, match="data CRC mismatch"):
        source.read(second.key)


@pytest.mark.parametrize("writer", ["libero_rlds", "lerobot_v3"])
def test_step_by_step_reads_load_an_episode_once(tmp_path, monkeypatch, writer):
    written = WRITERS[writer](tmp_path)
    source = open_source(written.path)
    loads = []
    original = source._load
    monkeypatch.setattr(source, "_load", lambda *args: loads.append(1) or original(*args))
    info = source.episodes()[1]
    frames = [source.read(info.key, step, step + 1).frames for step in range(info.num_steps)]
    assert len(loads) == 1
    np.testing.assert_array_equal(np.concatenate(frames), source.read(info.key).frames)


def test_robotwin_channel_order(tmp_path):
    legacy = syn.write_robotwin(tmp_path / "l", tasks=1, episodes=1, steps=2, height=64, width=96)
    marked = syn.write_robotwin(tmp_path / "m", layout="xpolicylab", tasks=1, episodes=1, steps=2, height=64, width=96)
    legacy_file, marked_file = legacy.files[0], marked.files[0]
    with h5py.File(legacy_file) as h5:
        legacy_jpeg = h5["observation/head_camera/rgb"][0]
    with h5py.File(marked_file) as h5:
        marked_jpeg = h5["vision/cam_head/colors"][0]
    assert opencv_channel_order(legacy_jpeg) and not opencv_channel_order(marked_jpeg)
    assert legacy_jpeg[-2:] == b"\xff\xd9"  # NUL padding stripped on read
    for written, jpeg in ((legacy, legacy_jpeg), (marked, marked_jpeg)):
        expected = next(iter(written.episodes.values())).frames[0, 0]
        assert_frames(decode_image(jpeg, bgr=opencv_channel_order(jpeg))[None, None], expected[None, None], lossy=True)


def test_robotwin_front_camera_and_layout_keys(tmp_path):
    written = syn.write_robotwin(tmp_path, tasks=1, episodes=2, steps=2, height=32, width=48, front_camera=True)
    source = open_source(written.path, views=("front", "head"))
    key, expected = next(iter(written.episodes.items()))
    assert key == "robotwin/place_dual_shoes/demo_clean/episode0"
    assert_frames(source.read(key).frames, expected.frames[:, [3, 0]], lossy=True)
    assert source.describe()["variant"] == "legacy_2.0"
    with pytest.raises(
        SfcacheError, match=r"choose distinct names from \['head', 'left_wrist', 'right_wrist', 'front'\]"
    ):
        open_source(written.path, views=("third_view",))  # the views of the files, not of both layouts


@pytest.mark.parametrize("layout, front, available", [
    ("legacy", False, ["head", "left_wrist", "right_wrist"]),
    ("legacy", True, ["head", "left_wrist", "right_wrist", "front"]),
    ("xpolicylab", False, ["head", "left_wrist", "right_wrist"]),
])  # fmt: skip
def test_inspect_source_lists_only_the_robotwin_cameras_the_files_have(tmp_path, capsys, layout, front, available):
    import json

    from sfcache.cli.main import main
    from tests._cli_helpers import run_main

    written = syn.write_robotwin(tmp_path, layout=layout, tasks=1, episodes=1, steps=2, height=16, width=16,
                                 front_camera=front)  # fmt: skip
    code, output = run_main(main, capsys, "inspect-source", written.path, "--json")
    assert code == 0 and json.loads(output)["available_views"] == available


def test_a_robotwin_first_file_without_a_standard_camera_is_skipped_not_fatal(tmp_path):
    written = syn.write_robotwin(tmp_path, tasks=1, episodes=3, steps=2, height=16, width=16)
    with h5py.File(written.files[0], "r+") as h5:
        del h5["observation/left_camera"]
    source = open_source(written.path, skip_bad=True)
    assert source.views == ("head", "left_wrist", "right_wrist") and len(source.episodes()) == 2
    assert "observation/left_camera/rgb" in str(source.skipped[0])


def test_a_robotwin_camera_missing_from_a_later_file_is_named(tmp_path):
    syn.write_robotwin(tmp_path, tasks=1, episodes=1, steps=2, height=16, width=16, front_camera=True)
    syn.write_robotwin(tmp_path / "z", tasks=1, episodes=1, steps=2, height=16, width=16)  # sorts after: no front
    with pytest.raises(SourceError, match="key 'observation/front_camera/rgb': missing"):
        open_source(tmp_path, views=("head", "front")).episodes()


def test_view_selection_and_order(tmp_path):
    written = syn.write_libero_hdf5(tmp_path, tasks=1, demos=1, steps=2, size=32)
    key, expected = next(iter(written.episodes.items()))
    swapped = open_source(written.path, views=("wrist", "primary"))
    assert swapped.views == ("wrist", "primary")
    np.testing.assert_array_equal(swapped.read(key).frames, expected.frames[:, ::-1])
    np.testing.assert_array_equal(open_source(written.path, views=("wrist",)).read(key).frames, expected.frames[:, 1:])
    with pytest.raises(SfcacheError, match=r"choose distinct names from \['primary', 'wrist'\]"):
        open_source(written.path, views=("head",))


def test_auto_detection(tmp_path):
    cases = {
        "libero_hdf5": syn.write_libero_hdf5(tmp_path / "a", tasks=1, demos=1, steps=2, size=16),
        "libero_rlds": syn.write_libero_rlds(tmp_path / "b", episodes=1, steps=2, size=16, shards=1),
        "lerobot": syn.write_lerobot(tmp_path / "c", episodes=1, steps=2, size=16),
        "robotwin": syn.write_robotwin(tmp_path / "d", tasks=1, episodes=1, steps=2, height=16, width=16),
    }
    assert set(cases) == set(FORMATS)
    for name, written in cases.items():
        assert open_source(written.path).format == name
    for name in ("libero_hdf5", "robotwin"):  # one HDF5 file is a source too
        assert open_source(cases[name].files[0]).format == name
    with pytest.raises(SfcacheError, match="unknown source format 'tfds'"):
        open_source(tmp_path / "a", format="tfds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="cannot tell the dataset format"):
        open_source(tmp_path / "empty")


def test_single_file_sources(tmp_path):
    written = syn.write_robotwin(tmp_path, layout="xpolicylab", tasks=1, episodes=2, steps=2, height=16, width=16)
    source = open_source(written.files[1])
    assert [info.key for info in source.episodes()] == [list(written.episodes)[1]]


def test_fingerprint_follows_the_files(tmp_path):
    written = syn.write_lerobot(tmp_path / "d", episodes=2, steps=2, size=16)
    before = open_source(written.path).describe()["fingerprint"]
    copy = tmp_path / "copy"
    shutil.copytree(written.path, copy, copy_function=shutil.copy2)
    assert open_source(copy).describe()["fingerprint"] == before  # relative paths, sizes, mtimes
    stat = written.files[0].stat()
    os.utime(written.files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert open_source(written.path).describe()["fingerprint"] != before


def test_demo_dataset(tmp_path):
    path = syn.write_demo_dataset(tmp_path)
    source = open_source(path)
    infos = source.episodes()
    assert source.format == "libero_hdf5" and len(infos) == 6 and {i.num_steps for i in infos} == {16}
    assert source.read(infos[0].key, 0, 1).frames.shape == (1, 2, 128, 128, 3)


# --- sf inspect-source ------------------------------------------------------------------------------


def test_cli_inspect_source_table_and_json(tmp_path):
    written = syn.write_libero_rlds(tmp_path, episodes=3, steps=4, size=32, shards=1)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect-source", str(written.path)])
    assert result.exit_code == 0, result.output
    assert "libero_rlds" in result.output and "libero_10_no_noops/episode_000000" in result.output
    result = runner.invoke(app, ["inspect-source", str(written.path), "--views", "wrist,primary", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["format"] == "libero_rlds" and report["episodes"] == 3 and report["steps"] == 12
    assert report["views"] == ["wrist", "primary"] and report["available_views"] == ["primary", "wrist"]
    assert report["frame_size"] == [32, 32]
    assert report["first_episodes"][0]["instruction"] == next(iter(written.episodes.values())).instruction


def test_cli_inspect_source_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["inspect-source", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert isinstance(result.exception, SourceError) and "no such file or directory" in str(result.exception)


READ_STAGE_CASES = (
    "libero_nan_actions",
    "libero_nan_proprio",
    "rlds_bad_jpeg",
    "rlds_nan_action",
    "lerobot_bad_png",
    "lerobot_nan_actions",
    "lerobot_state_width",
    "lerobot_v3_nan_actions",
    "robotwin_bad_jpeg",
    "robotwin_nan_vector",
    "xpolicylab_bad_jpeg",
    "xpolicylab_nan_state",
    "xpolicylab_frame_sizes",
)


@pytest.mark.parametrize("writer, case", [p for p in BAD_INPUT if p.id in READ_STAGE_CASES])
def test_frame_free_read_checks_vectors_and_skips_images(tmp_path, writer, case):
    """Damaged actions/proprio fail the frame-free read with the full read's error; damaged images do not."""
    written = writer(tmp_path)
    damage = case(written)
    assert damage.stage == "read"
    source = open_source(written.path)
    with pytest.raises(SourceError) as full:
        source.read(damage.episode)
    if "non-finite" in damage.expected or "expected float" in damage.expected:
        with pytest.raises(SourceError) as frame_free:
            source.read(damage.episode, frames=False)
        assert str(frame_free.value) == str(full.value)
    else:  # an undecodable image or mismatched frame sizes
        vectors = source.read(damage.episode, frames=False)
        assert vectors.frames is None and len(vectors.actions) == len(written.episodes[damage.episode].actions)
