"""LeRobot as LeRobot writes it (info.json columns, video cameras), views by mapping, and WithTargets joins."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from sfcache.cli.main import app
from sfcache.errors import SfcacheError, SourceError, StoreError
from sfcache.sources import open_source, recorded_views
from sfcache.sources import synthetic as syn
from sfcache.sources.video import VideoFiles
from sfcache.torch import CachedTargets, WithTargets
from tests._train_helpers import CHANNELS, GRID, content_targets, write_store
from tests.data.make_lerobot_real import expected as real_expected

CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module", params=["v2.1", "v3.0"])
def aloha(request, tmp_path_factory) -> syn.Written:
    """LeRobot's own names, 3 cameras of which the first two are AV1 videos, 14-d action and state."""
    return syn.write_lerobot(
        tmp_path_factory.mktemp(request.param),
        episodes=3,
        steps=5,
        size=32,
        version=request.param,
        names="lerobot",
        cameras=3,
        videos=2,
    )


def test_lerobot_names_and_video_cameras(aloha):
    source = open_source(aloha.path)
    assert source.views == CAMERAS
    rendered = syn.render_episode(np.zeros((1, 2)), 3, 32, 32)  # decoded video is near the scene
    for key, expected in aloha.episodes.items():
        steps = source.read(key)
        np.testing.assert_array_equal(steps.frames, expected.frames)  # exactly the decoded frames
        assert steps.actions.shape == (5, 14) and steps.proprio.shape == (5, 14)
        np.testing.assert_allclose(steps.actions, expected.actions, rtol=1e-6)
        np.testing.assert_allclose(steps.proprio, expected.proprio, rtol=1e-6)
        for step in (3, 1):  # seeks back and forth in the file
            np.testing.assert_array_equal(source.read(key, step, step + 2).frames, expected.frames[step : step + 2])
    assert mean_error(steps.frames[:1, :2], rendered[:, :2]) < 40


class CountingContainer:
    """A PyAV container that counts the frames its decoder yields."""

    def __init__(self, container, decoded: list):
        self._container, self._decoded = container, decoded

    def __getattr__(self, name):
        return getattr(self._container, name)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._decoded.append(frame.pts)
            yield frame


def test_video_seeks_and_decodes_only_up_to_the_asked_frames(aloha):
    """GOP 2: a read of one late step decodes at most the keyframe before it and the step itself."""
    source = open_source(aloha.path, views=("cam_high",))
    source.episodes()
    decoded: list = []
    files = source._process_local("videos", VideoFiles)
    opened = files.container
    files.container = lambda *args: CountingContainer(opened(*args), decoded)
    key = "episode_000002"
    steps = source.read(key, 4, 5)
    np.testing.assert_array_equal(steps.frames, aloha.episodes[key].frames[4:5, :1])
    assert 1 <= len(decoded) <= 3  # v3.0 packs 15 frames in the file, v2.1 5 in the episode's


def test_views_by_mapping_lerobot(aloha):
    views = ("base=observation.images.cam_high", "right_wrist=observation.images.cam_right_wrist")
    source = open_source(aloha.path, views=views)
    assert source.views == ("base", "right_wrist")
    key, expected = next(iter(aloha.episodes.items()))
    np.testing.assert_array_equal(source.read(key).frames, expected.frames[:, [0, 2]])
    described = source.describe()
    assert described["view_map"] == {
        "base": "observation.images.cam_high",
        "right_wrist": "observation.images.cam_right_wrist",
    }
    assert recorded_views(described) == views
    with pytest.raises(
        SourceError,
        match=r"view top=observation.images.top: not an image or video feature "
        r"\(cameras: \['observation.images.cam_high'",
    ):
        open_source(aloha.path, views=("top=observation.images.top",)).episodes()
    with pytest.raises(SfcacheError, match="expected name=column"):
        open_source(aloha.path, views=("=observation.images.cam_high",))
    result = CliRunner().invoke(
        app,
        [
            "inspect-source",
            str(aloha.path),
            "--views",
            "left_wrist=observation.images.cam_left_wrist,cam_high",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["views"] == ["left_wrist", "cam_high"]


def test_openpi_names_keep_their_views(tmp_path):
    written = syn.write_lerobot(tmp_path, episodes=1, steps=3, size=32, videos=1)  # `image` as a video
    source = open_source(written.path)
    assert source.views == ("primary", "wrist")
    np.testing.assert_array_equal(source.read("episode_000000").frames, written.episodes["episode_000000"].frames)


def test_views_by_mapping_robotwin(tmp_path):
    legacy = syn.write_robotwin(tmp_path / "l", tasks=1, episodes=1, steps=2, height=32, width=48, front_camera=True)
    source = open_source(legacy.path, views=("base=head_camera", "extra=observation/front_camera/rgb", "left_wrist"))
    key, expected = next(iter(legacy.episodes.items()))
    assert np.abs(source.read(key).frames.astype(int) - expected.frames[:, [0, 3, 1]]).mean() < 6
    assert source.describe()["view_map"] == {"base": "head_camera", "extra": "observation/front_camera/rgb"}
    xpl = syn.write_robotwin(tmp_path / "x", layout="xpolicylab", tasks=1, episodes=1, steps=2, height=32, width=48)
    key, expected = next(iter(xpl.episodes.items()))
    mapped = open_source(xpl.path, views=("wrist=cam_left_wrist",)).read(key).frames
    assert np.abs(mapped.astype(int) - expected.frames[:, [1]]).mean() < 6
    with pytest.raises(SourceError, match=r"view top=cam_top: no such camera \(cameras: \['cam_head'"):
        open_source(xpl.path, views=("top=cam_top",)).episodes()


def test_missing_columns_name_file_and_what_exists(tmp_path):
    written = syn.write_lerobot(tmp_path / "a", episodes=2, steps=3, size=16, version="v3.0", names="lerobot")
    data = written.files[0]
    table = pq.read_table(data)
    pq.write_table(table.drop(["action"]), data)
    with pytest.raises(
        SourceError,
        match=r"file-000.parquet, episode episode_000000, key 'action': missing column "
        r"\(has \['observation.images.cam_high'",
    ):
        open_source(written.path).episodes()
    info_file = written.path / "meta" / "info.json"
    info = json.loads(info_file.read_text())
    del info["features"]["action"]
    info_file.write_text(json.dumps(info))
    with pytest.raises(SourceError, match=r"info.json, key 'features': no 'action' or 'actions' feature \(features: "):
        open_source(written.path).episodes()
    video = syn.write_lerobot(tmp_path / "v", episodes=2, steps=3, size=32, videos=2)
    (video.path / "videos" / "chunk-000" / "image" / "episode_000001.mp4").unlink()
    with pytest.raises(SourceError, match=r"episode_000001.mp4, episode episode_000001, key 'image': missing video"):
        open_source(video.path).episodes()


@pytest.mark.parametrize("version", ["v21", "v30"])
def test_dataset_written_by_real_lerobot(version):
    """tests/data/lerobot_<version>_real were written by lerobot 0.3.2 (v2.1) and 0.4.4 (v3.0) with
    make_lerobot_real.py: an AV1 video camera and a PNG camera, 3 episodes of 4, 6, 5 frames."""
    import av

    root = Path(__file__).parent / "data" / f"lerobot_{version}_real"
    source = open_source(root)
    assert (
        source.views == ("cam_high", "cam_left_wrist") and source.describe()["variant"] == f"v{version[1]}.{version[2]}"
    )
    assert [(i.key, i.instruction, i.num_steps) for i in source.episodes()] == [
        ("episode_000000", "task 0", 4),
        ("episode_000001", "task 1", 6),
        ("episode_000002", "task 0", 5),
    ]
    sequential = []  # independent path: decode every frame of every file
    for file in sorted(root.rglob("*.mp4")):
        with av.open(str(file)) as container:
            sequential += [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    first = 0
    for info, (high, wrist, state, action, _) in zip(source.episodes(), real_expected()):
        steps = source.read(info.key)
        np.testing.assert_array_equal(steps.frames[:, 1], wrist)  # PNG: exact
        np.testing.assert_array_equal(steps.frames[:, 0], np.stack(sequential[first : first + len(high)]))
        assert mean_error(steps.frames[:, 0], high) < 12  # AV1 crf 30 of the scene
        np.testing.assert_array_equal(steps.proprio, state)
        np.testing.assert_array_equal(steps.actions, action)
        first += len(high)
    assert first == len(sequential)


# --- WithTargets: joins to LeRobot-style samples ------------------------------------------------------


class Meta:
    def __init__(self, episodes: dict):
        self.episodes = episodes


class LeRobotLike(torch.utils.data.Dataset):
    """What LeRobotDataset 0.4 serves, read straight from the files: flat rows with `index`,
    `episode_index`, `frame_index`; `meta.episodes` rows; `episodes=` keeps only those episodes."""

    def __init__(self, root: Path, episodes: list[int] | None = None):
        meta = pq.read_table(next((root / "meta" / "episodes").rglob("*.parquet"))).to_pydict()
        self.meta = Meta(meta)
        self.episodes = episodes
        rows = pq.read_table(
            next((root / "data").rglob("*.parquet")), columns=["index", "episode_index", "frame_index"]
        ).to_pylist()
        self.rows = [r for r in rows if episodes is None or r["episode_index"] in episodes]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {**{k: torch.tensor(v) for k, v in self.rows[i].items()}, "observation.state": torch.zeros(2)}


def drop_unknown_keys(batch: dict) -> dict:
    """Like LeRobot's policy preprocessor: keeps observation.*, action and complementary fields such as index."""
    return {k: v for k, v in batch.items() if k.startswith("observation.") or k in ("action", "index")}


@pytest.fixture(scope="module")
def lerobot_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("join")
    written = syn.write_lerobot(
        root / "data", episodes=3, steps=5, size=32, version="v3.0", names="lerobot", cameras=2, videos=1
    )
    store = write_store(root / "store", written.path)
    truth = {key: content_targets(e.frames, GRID, CHANNELS) for key, e in written.episodes.items()}
    return written, store, truth


def expected_for(truth, batch) -> torch.Tensor:
    return torch.stack(
        [
            torch.from_numpy(truth[f"episode_{int(e):06d}"][int(f)])
            for e, f in zip(batch["episode_index"], batch["frame_index"])
        ]
    )


def key_of(sample):
    return f"episode_{int(sample['episode_index']):06d}"


def step_of(sample):
    return int(sample["frame_index"])


@pytest.mark.own_process  # fork copies every thread's locks; other tests leave Dask and zarr threads behind
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_index_join_in_workers_and_after_a_preprocessor(lerobot_store, context):
    written, store, truth = lerobot_store
    targets = CachedTargets(store, add_position_embedding=False)
    dataset = LeRobotLike(written.path, episodes=[0, 2])
    joined = WithTargets(dataset, targets, index="index")
    loader = torch.utils.data.DataLoader(
        joined,
        batch_size=4,
        shuffle=True,
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context(context),
        generator=torch.Generator().manual_seed(0),
        timeout=120,
    )  # fail, not hang
    seen = 0
    for batch in loader:
        assert set(batch["episode_index"].tolist()) <= {0, 2}
        keys = [f"episode_{int(e):06d}" for e in batch["episode_index"]]
        torch.testing.assert_close(batch["sf_targets"], targets.targets_for(keys, batch["frame_index"]), rtol=0, atol=0)
        torch.testing.assert_close(batch["sf_targets"], expected_for(truth, batch), rtol=0, atol=2e-3)  # float16
        torch.testing.assert_close(joined.targets_for(drop_unknown_keys(batch)), batch["sf_targets"], rtol=0, atol=0)
        seen += len(batch["index"])
    assert seen == 10
    by_key = WithTargets(dataset, targets, key=key_of, step=step_of)
    torch.testing.assert_close(by_key[7]["sf_targets"], joined[7]["sf_targets"], rtol=0, atol=0)


def test_joins_refuse_a_store_of_other_episodes(lerobot_store, tmp_path):
    written, _, _ = lerobot_store
    short = syn.write_lerobot(
        tmp_path / "short", episodes=3, steps=4, size=32, version="v3.0", names="lerobot", cameras=2, videos=1
    )
    targets = CachedTargets(write_store(tmp_path / "store", short.path))
    with pytest.raises(StoreError, match="episode_000000 has 4 steps in the store, 5 in the dataset"):
        WithTargets(LeRobotLike(written.path), targets, key=key_of, step=step_of)
    with pytest.raises(StoreError, match="episode_000001 has 4 steps in the store, 3 in the dataset"):
        WithTargets(LeRobotLike(written.path), targets, lengths={"episode_000001": 3})
    subset = tmp_path / "subset"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(written.path, subset)
    meta = next((subset / "meta" / "episodes").rglob("*.parquet"))
    pq.write_table(pq.read_table(meta).slice(1), meta)  # the store lacks episode 0
    partial = CachedTargets(write_store(tmp_path / "partial", subset))
    with pytest.raises(StoreError, match="episode_000001 starts at row 0 in the store, at index 5 in the dataset"):
        WithTargets(LeRobotLike(written.path, episodes=[1, 2]), partial, index="index")
    joined = WithTargets(LeRobotLike(written.path, episodes=[1, 2]), partial, key=key_of, step=step_of)
    assert joined[0]["sf_targets"].shape == (2, GRID * GRID, CHANNELS)
    with pytest.raises(SfcacheError, match="pass lengths="):
        WithTargets([{"index": 0}], partial, index="index")


def test_index_join_with_given_lengths_checks_first_rows(lerobot_store):
    written, store, _ = lerobot_store
    targets = CachedTargets(store, add_position_embedding=False)
    in_order = {key: 5 for key in written.episodes}  # 3 episodes of 5 steps, in order
    WithTargets([{"index": 0}], targets, index="index", lengths=in_order)
    swapped = dict(reversed(list(in_order.items())))  # same lengths, other order
    with pytest.raises(StoreError, match="starts at row 10 in the store, at index 0 in the dataset"):
        WithTargets([{"index": 0}], targets, index="index", lengths=swapped)


def test_extract_mapped_video_views_and_verify(tmp_path):
    """sf extract with --views name=column on a video LeRobot dataset; --verify reopens the recorded mapping."""
    import logging

    from distributed import LocalCluster

    from sfcache.store import open_cache

    written = syn.write_lerobot(
        tmp_path / "data", episodes=2, steps=2, size=32, version="v3.0", names="lerobot", cameras=3, videos=2
    )
    store = tmp_path / "store"
    views = "base=observation.images.cam_high,right=observation.images.cam_right_wrist"
    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        result = CliRunner().invoke(
            app,
            [
                "extract",
                str(written.path),
                "--out",
                str(store),
                "--vggt",
                "random:tiny",
                "--views",
                views,
                "--scheduler",
                cluster.scheduler_address,
            ],
        )
    assert result.exit_code == 0, result.output
    cache = open_cache(store)
    assert cache.views == ("base", "right") and cache.attrs["source"]["view_map"]["right"].endswith("cam_right_wrist")
    result = CliRunner().invoke(app, ["inspect-cache", str(store), "--verify", "2", "--json"])
    assert result.exit_code == 0, result.output
    from sfcache.train.data import open_training_data

    data = open_training_data(written.path, store, None, grid=(16, 16), chunk=2, text_len=8, val_episodes=1)
    assert data.views == ("base", "right")  # sf train reopens the recorded mapping


def test_video_timestamp_without_a_frame_is_a_clear_error(tmp_path):
    written = syn.write_lerobot(tmp_path, episodes=1, steps=4, size=32, names="lerobot", cameras=1, videos=1)
    data = written.files[0]
    table = pq.read_table(data)
    shifted = table.set_column(
        table.schema.get_field_index("timestamp"),
        "timestamp",
        [table.column("timestamp").to_numpy() + np.float32(0.05)],
    )
    pq.write_table(shifted, data)
    with pytest.raises(
        SourceError,
        match=r"episode_000000.mp4, episode episode_000000, key 'observation.images.cam_high'"
        r": no frame within 0.0001 s of timestamp 0.0500 s",
    ):
        open_source(written.path).read("episode_000000")
