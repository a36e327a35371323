"""A bad-input corpus for every format, made by damaging files from the fixture writers.

Each case says where the problem must surface: "scan" (episodes(): structure, skip_bad applies) or
"read" (read(): decoding, non-finite values). Every error must be one SourceError line naming the
file, the episode and the key where they exist, and what was expected.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sfcache.cli.main import app, main
from sfcache.errors import SourceError
from sfcache.sources import open_source
from sfcache.sources import synthetic as syn
from sfcache.sources.libero_rlds import read_record, write_record
from sfcache.sources.synthetic.robotwin import _jpeg_with_marker
from sfcache.sources.tf_example import Example


@dataclass
class Damage:
    """What a damaged dataset must report."""

    file: Path
    episode: str | None  # None: the whole file is unusable
    key: str | None  # the dataset/feature/column at fault, if there is one
    expected: str  # fragment of the message saying what was expected or found
    stage: str  # "scan" or "read"


# --- damage helpers --------------------------------------------------------------------------------------


def replace(h5: h5py.File, name: str, data) -> None:
    del h5[name]
    h5[name] = data


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def rewrite_record(shard: Path, index: int, mutate: Callable[[Example], None]) -> None:
    """Re-frame a TFRecord shard with one Example changed (valid CRCs, so only the content is bad)."""
    records, offset = [], 0
    with open(shard, "rb") as handle:
        while offset < shard.stat().st_size:
            data, offset = read_record(handle, shard, offset, len(records))
            records.append(Example.FromString(data))
    mutate(records[index].features.feature)
    with open(shard, "wb") as handle:
        for example in records:
            write_record(handle, example.SerializeToString())


def set_floats(feature, values) -> None:
    del feature.float_list.value[:]
    feature.float_list.value.extend(values)


def set_bytes(feature, values) -> None:
    del feature.bytes_list.value[:]
    feature.bytes_list.value.extend(values)


def rewrite_parquet(file: Path, change: Callable[[dict], dict]) -> None:
    table = pq.read_table(file)
    pq.write_table(table.from_pydict(change(table.to_pydict())), file)


def set_episode_length(root: Path, index: int, length: int) -> None:
    meta = root / "meta" / "episodes.jsonl"
    lines = [json.loads(line) for line in meta.read_text().splitlines()]
    lines[index]["length"] = length
    meta.write_text("".join(json.dumps(line) + "\n" for line in lines))


# --- LIBERO HDF5 ---------------------------------------------------------------------------------------


def libero(tmp: Path) -> syn.Written:
    return syn.write_libero_hdf5(tmp, tasks=2, demos=2, steps=4, size=16)


def libero_demo(
    written: syn.Written,
    damage: Callable[[h5py.Group], None],
    *,
    key: str | None,
    expected: str,
    stage: str = "scan",
    demo: str = "demo_1",
) -> Damage:
    file = written.files[0]
    with h5py.File(file, "r+") as h5:
        damage(h5["data"][demo])
    episode = next(
        k
        for k in written.episodes
        if k.startswith(f"{file.parent.name}/") and k.endswith(demo) and file.name.removesuffix("_demo.hdf5") in k
    )
    return Damage(file, episode, key and f"data/{demo}/{key}", expected, stage)


def libero_missing_view(w):
    return libero_demo(
        w,
        lambda d: d.__delitem__("obs/agentview_rgb"),
        key="obs/agentview_rgb",
        expected="missing (expected uint8 array [any, any, any, 3])",
    )


def libero_actions_shape(w):
    return libero_demo(
        w,
        lambda d: replace(d, "actions", np.zeros((4, 6))),
        key="actions",
        expected="shape (4, 6), expected float array [any, 7]",
    )


def libero_images_dtype(w):
    return libero_demo(
        w,
        lambda d: replace(d, "obs/eye_in_hand_rgb", np.zeros((4, 16, 16, 3))),
        key="obs/eye_in_hand_rgb",
        expected="dtype float64, expected uint8",
    )


def libero_unequal_views(w):
    return libero_demo(
        w,
        lambda d: replace(d, "obs/eye_in_hand_rgb", d["obs/eye_in_hand_rgb"][:3]),
        key=None,
        expected="per-step datasets disagree on the number of steps (data/demo_1/actions 4, "
        "data/demo_1/obs/agentview_rgb 4, data/demo_1/obs/eye_in_hand_rgb 3",
    )


def libero_short_actions(w):
    return libero_demo(
        w,
        lambda d: replace(d, "actions", d["actions"][:2]),
        key=None,
        expected="disagree on the number of steps (data/demo_1/actions 2",
    )


def libero_empty(w):
    def empty(demo):
        for name in (
            "actions",
            "obs/agentview_rgb",
            "obs/eye_in_hand_rgb",
            "obs/ee_pos",
            "obs/ee_ori",
            "obs/gripper_states",
        ):
            replace(demo, name, demo[name][:0])

    return libero_demo(w, empty, key="actions", expected="empty episode (0 steps)")


def libero_non_finite(w, key: str, where: tuple[int, int], value: float) -> Damage:
    """`value` (NaN or inf) written into dataset `key` of the first demo at (step, column)."""

    def poison(demo):
        values = demo[key][:]
        values[where] = value
        replace(demo, key, values)

    return libero_demo(w, poison, key=key, expected=f"non-finite value at step {where[0]}", stage="read")


def libero_nan_actions(w):
    return libero_non_finite(w, "actions", (2, 3), np.nan)


def libero_nan_proprio(w):
    return libero_non_finite(w, "obs/gripper_states", (3, 0), np.inf)


def libero_truncated(w):
    truncate(w.files[1])
    return Damage(w.files[1], None, None, "cannot open as HDF5 (truncated or not HDF5", "scan")


def libero_bad_problem_info(w):
    with h5py.File(w.files[0], "r+") as h5:
        h5["data"].attrs["problem_info"] = "{not json"
    return Damage(w.files[0], None, "data.attrs['problem_info']", "not JSON with 'language_instruction'", "scan")


# --- LIBERO RLDS ---------------------------------------------------------------------------------------


def rlds(tmp: Path) -> syn.Written:
    return syn.write_libero_rlds(tmp, episodes=4, steps=3, size=16, shards=2)


def rlds_record(
    written: syn.Written, mutate: Callable[[dict], None], *, key: str | None, expected: str, stage: str = "scan"
) -> Damage:
    rewrite_record(written.files[0], 1, mutate)
    return Damage(written.files[0], list(written.episodes)[1], key, expected, stage)


def rlds_missing_action(w):
    return rlds_record(
        w, lambda f: f.__delitem__("steps/action"), key="steps/action", expected="missing feature (expected float_list)"
    )


def rlds_state_count(w):
    return rlds_record(
        w,
        lambda f: set_floats(f["steps/observation/state"], [0.0] * 23),
        key="steps/observation/state",
        expected="23 values, expected 3 steps x 8",
    )


def rlds_short_view(w):
    return rlds_record(
        w,
        lambda f: set_bytes(
            f["steps/observation/wrist_image"], f["steps/observation/wrist_image"].bytes_list.value[:2]
        ),
        key="steps/observation/wrist_image",
        expected="2 values, expected 3 steps x 1",
    )


def rlds_wrong_kind(w):
    return rlds_record(
        w,
        lambda f: (f["steps/action"].ClearField("float_list"), f["steps/action"].bytes_list.value.append(b"x")),
        key="steps/action",
        expected="holds bytes_list, expected float_list",
    )


def rlds_empty(w):
    def empty(features):
        for feature in features.values():
            getattr(feature, feature.WhichOneof("kind")).ClearField("value")

    return rlds_record(w, empty, key="steps/is_first", expected="empty episode (0 steps)")


def rlds_bad_jpeg(w):
    def garble(features):
        images = list(features["steps/observation/image"].bytes_list.value)
        images[2] = images[2][:40]
        set_bytes(features["steps/observation/image"], images)

    return rlds_record(w, garble, key="steps/observation/image", expected="step 2: undecodable JPEG", stage="read")


def rlds_nan_action(w):
    def poison(features):
        values = list(features["steps/action"].float_list.value)
        values[7 + 2] = float("nan")
        set_floats(features["steps/action"], values)

    return rlds_record(w, poison, key="steps/action", expected="non-finite value at step 1", stage="read")


def rlds_truncated(w):
    shard = w.files[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return Damage(shard, list(w.episodes)[1], None, "truncated at byte", "scan")


def rlds_corrupt(w):
    shard = w.files[1]
    data = bytearray(shard.read_bytes())
    data[500] ^= 0x55
    shard.write_bytes(bytes(data))
    return Damage(shard, list(w.episodes)[2], None, "record 0 at byte 0: data CRC mismatch", "scan")


def rlds_missing_shard(w):
    w.files[1].unlink()
    return Damage(w.files[1], None, None, "missing shard (dataset_info.json lists it with 2 episodes)", "scan")


# --- LeRobot ---------------------------------------------------------------------------------------------


def lerobot(tmp: Path) -> syn.Written:
    return syn.write_lerobot(tmp, episodes=3, steps=4, size=16)


def lerobot_case(w, change, *, key, expected, stage="scan", index=1) -> Damage:
    change(w.files[index])
    return Damage(w.files[index], f"episode_{index:06d}", key, expected, stage)


def lerobot_missing_file(w):
    return lerobot_case(w, Path.unlink, key=None, expected="missing parquet file listed in the episode metadata")


def lerobot_truncated(w):
    return lerobot_case(w, truncate, key=None, expected="not a readable parquet file")


def lerobot_missing_column(w):
    return lerobot_case(
        w,
        lambda f: rewrite_parquet(f, lambda d: {k: v for k, v in d.items() if k != "wrist_image"}),
        key="wrist_image",
        expected="missing column",
    )


def lerobot_row_count(w):
    return lerobot_case(
        w,
        lambda f: set_episode_length(w.path, 1, 5),
        key=None,
        expected="4 rows, the episode metadata needs rows [0, 5)",
    )


def lerobot_empty(w):
    return lerobot_case(
        w,
        lambda f: set_episode_length(w.path, 1, 0),
        key=None,
        expected="empty episode (0 steps in the episode metadata)",
    )


def _lerobot_rows(change_row):
    def change(columns):
        change_row(columns)
        return columns

    return lambda file: rewrite_parquet(file, change)


def lerobot_bad_png(w):
    return lerobot_case(
        w,
        _lerobot_rows(lambda c: c["image"][2].update(bytes=c["image"][2]["bytes"][:60])),
        key="image",
        expected="step 2: undecodable PNG",
        stage="read",
    )


def lerobot_nan_actions(w):
    return lerobot_case(
        w,
        _lerobot_rows(lambda c: c["actions"][1].__setitem__(0, float("nan"))),
        key="actions",
        expected="non-finite value at step 1",
        stage="read",
    )


def lerobot_state_width(w):
    return lerobot_case(
        w,
        _lerobot_rows(lambda c: c.update(state=[row[:7] for row in c["state"]])),
        key="state",
        expected="shape (4, 7), expected float [T, 8]",
        stage="read",
    )


def lerobot_v3(tmp: Path) -> syn.Written:
    return syn.write_lerobot(tmp, episodes=3, steps=5, size=16, version="v3.0")


def lerobot_v3_nan_actions(w):
    rewrite_parquet(w.files[0], lambda c: (c["actions"][5 + 2].__setitem__(3, float("inf")), c)[1])
    return Damage(w.files[0], "episode_000001", "actions", "non-finite value at step 2", "read")


def lerobot_v3_rows_missing(w):
    meta = w.path / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(meta).to_pydict()
    table["length"][2] = 6
    pq.write_table(pq.read_table(meta).from_pydict(table), meta)
    return Damage(w.files[0], "episode_000002", None, "15 rows, the episode metadata needs rows [10, 16)", "scan")


# --- RoboTwin (legacy and XPolicyLab) -------------------------------------------------------------------


def robotwin(tmp: Path) -> syn.Written:
    return syn.write_robotwin(tmp, tasks=1, episodes=3, steps=4, height=24, width=32)


def xpolicylab(tmp: Path) -> syn.Written:
    return syn.write_robotwin(tmp, layout="xpolicylab", tasks=1, episodes=3, steps=4, height=24, width=32)


def robotwin_case(w, damage: Callable[[h5py.File], None], *, key, expected, stage="scan") -> Damage:
    file = w.files[1]
    with h5py.File(file, "r+") as h5:
        damage(h5)
    return Damage(file, list(w.episodes)[1], key, expected, stage)


def _garble_jpeg(name: str) -> Callable[[h5py.File], None]:
    def garble(h5):
        frames = list(h5[name][:])
        frames[3] = b"\xff\xd8\xff\xe0 this is no jpeg"
        replace(h5, name, np.array(frames, dtype=h5[name].dtype))

    return garble


def _poison(name: str, step: int) -> Callable[[h5py.File], None]:
    def poison(h5):
        values = h5[name][:]
        values[step, 0] = np.nan
        replace(h5, name, values)

    return poison


def robotwin_missing_camera(w):
    return robotwin_case(
        w,
        lambda h5: h5.__delitem__("observation/left_camera"),
        key="observation/left_camera/rgb",
        expected="missing (expected encoded image bytes [any])",
    )


def robotwin_short_view(w):
    return robotwin_case(
        w,
        lambda h5: replace(h5, "observation/right_camera/rgb", h5["observation/right_camera/rgb"][:2]),
        key=None,
        expected="observation/right_camera/rgb 2",
    )


def robotwin_vector_shape(w):
    return robotwin_case(
        w,
        lambda h5: replace(h5, "joint_action/vector", h5["joint_action/vector"][:, :12]),
        key="joint_action/vector",
        expected="shape (4, 12), expected float array [any, 14]",
    )


def robotwin_bad_jpeg(w):
    return robotwin_case(
        w,
        _garble_jpeg("observation/head_camera/rgb"),
        key="observation/head_camera/rgb",
        expected="step 3: undecodable JPEG",
        stage="read",
    )


def robotwin_nan_vector(w):
    return robotwin_case(
        w,
        _poison("joint_action/vector", 2),
        key="joint_action/vector",
        expected="non-finite value at step 2",
        stage="read",
    )


def robotwin_empty(w):
    def empty(h5):
        for name in (
            "observation/head_camera/rgb",
            "observation/left_camera/rgb",
            "observation/right_camera/rgb",
            "joint_action/vector",
        ):
            replace(h5, name, h5[name][:0])

    return robotwin_case(w, empty, key="observation/head_camera/rgb", expected="empty episode (0 steps)")


def robotwin_missing_instructions(w):
    file = w.files[1].parent.parent / "instructions" / "episode1.json"
    file.unlink()
    return Damage(file, list(w.episodes)[1], None, "missing instructions file", "scan")


def robotwin_truncated(w):
    truncate(w.files[1], keep=0.3)
    return Damage(w.files[1], None, None, "cannot open as HDF5", "scan")


def xpolicylab_missing_action(w):
    return robotwin_case(
        w,
        lambda h5: h5.__delitem__("action/right_ee_joint_states"),
        key="action/right_ee_joint_states",
        expected="missing (expected float array [any, any])",
    )


def xpolicylab_no_instructions(w):
    return robotwin_case(
        w,
        lambda h5: h5.__delitem__("instructions"),
        key="instructions",
        expected="expected a JSON list of instructions",
    )


def xpolicylab_bad_jpeg(w):
    return robotwin_case(
        w,
        _garble_jpeg("vision/cam_left_wrist/colors"),
        key="vision/cam_left_wrist/colors",
        expected="step 3: undecodable JPEG",
        stage="read",
    )


def xpolicylab_nan_state(w):
    return robotwin_case(
        w,
        _poison("state/left_arm_joint_states", 1),
        key="state/left_arm_joint_states",
        expected="non-finite value at step 1",
        stage="read",
    )


def xpolicylab_frame_sizes(w):
    def resize(h5):
        frames = [_jpeg_with_marker(np.zeros((12, 16, 3), np.uint8)) for _ in range(4)]
        replace(h5, "vision/cam_right_wrist/colors", np.array(frames))

    return robotwin_case(
        w,
        resize,
        key=None,
        expected="views have different frame sizes (head 24x32, left_wrist 24x32, right_wrist 12x16)",
        stage="read",
    )


CASES = {
    libero: [
        libero_missing_view,
        libero_actions_shape,
        libero_images_dtype,
        libero_unequal_views,
        libero_short_actions,
        libero_empty,
        libero_nan_actions,
        libero_nan_proprio,
        libero_truncated,
        libero_bad_problem_info,
    ],
    rlds: [
        rlds_missing_action,
        rlds_state_count,
        rlds_short_view,
        rlds_wrong_kind,
        rlds_empty,
        rlds_bad_jpeg,
        rlds_nan_action,
        rlds_truncated,
        rlds_corrupt,
        rlds_missing_shard,
    ],
    lerobot: [
        lerobot_missing_file,
        lerobot_truncated,
        lerobot_missing_column,
        lerobot_row_count,
        lerobot_empty,
        lerobot_bad_png,
        lerobot_nan_actions,
        lerobot_state_width,
    ],
    lerobot_v3: [lerobot_v3_nan_actions, lerobot_v3_rows_missing],
    robotwin: [
        robotwin_missing_camera,
        robotwin_short_view,
        robotwin_vector_shape,
        robotwin_bad_jpeg,
        robotwin_nan_vector,
        robotwin_empty,
        robotwin_missing_instructions,
        robotwin_truncated,
    ],
    xpolicylab: [
        xpolicylab_missing_action,
        xpolicylab_no_instructions,
        xpolicylab_bad_jpeg,
        xpolicylab_nan_state,
        xpolicylab_frame_sizes,
    ],
}
PARAMS = [pytest.param(writer, case, id=case.__name__) for writer, cases in CASES.items() for case in cases]


def assert_names_everything(err: SourceError, damage: Damage) -> None:
    message = str(err)
    assert "\n" not in message
    assert err.file == str(damage.file) and message.startswith(str(damage.file))
    assert err.episode == damage.episode
    if damage.episode is not None:
        assert f"episode {damage.episode}" in message
    if damage.key is not None:
        assert err.key == damage.key and repr(damage.key) in message
    assert damage.expected in message


@pytest.mark.parametrize("writer, case", PARAMS)
def test_bad_input(tmp_path, writer, case):
    written = writer(tmp_path)
    damage = case(written)
    if damage.stage == "scan":
        with pytest.raises(SourceError) as raised:
            open_source(written.path).episodes()
        assert_names_everything(raised.value, damage)
        source = open_source(written.path, skip_bad=True)
        kept = [info.key for info in source.episodes()]
        assert source.skipped and all(isinstance(err, SourceError) for err in source.skipped)
        assert_names_everything(source.skipped[0], damage)
        if damage.episode is not None:
            assert damage.episode not in kept
        assert kept and set(kept) < set(written.episodes)
        for key in kept:  # what is left reads cleanly
            assert source.read(key).frames.shape[0] == written.episodes[key].actions.shape[0]
    else:
        source = open_source(written.path)
        assert damage.episode in [info.key for info in source.episodes()]  # structure is fine
        with pytest.raises(SourceError) as raised:
            source.read(damage.episode)
        assert_names_everything(raised.value, damage)


def test_cli_lists_skipped_episodes_and_prints_one_line_errors(tmp_path, capsys):
    written = robotwin(tmp_path)
    damage = robotwin_missing_camera(written)
    result = CliRunner().invoke(app, ["inspect-source", str(written.path), "--skip-bad", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["episodes"] == 2 and len(report["skipped"]) == 1 and damage.episode in report["skipped"][0]
    with pytest.raises(SystemExit) as stopped:
        main(["inspect-source", str(written.path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert damage.episode in err and "observation/left_camera/rgb" in err


def test_a_dataset_folder_with_two_versions_is_refused_naming_them(tmp_path):
    """Two TFDS versions of one dataset hold the same episodes under shard names (TFDS ids) that collide."""
    written = syn.write_libero_rlds(tmp_path, episodes=2, steps=3, size=16, shards=1)
    shutil.copytree(written.path / "1.0.0", written.path / "1.1.0")
    with pytest.raises(SourceError, match=r"holds 2 versions \(1\.0\.0, 1\.1\.0\); expected one version per dataset"):
        open_source(tmp_path).episodes()
    assert [e.key for e in open_source(written.path / "1.1.0").episodes()] == [
        "libero_10_no_noops/episode_000000",
        "libero_10_no_noops/episode_000001",
    ]
