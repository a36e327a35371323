"""The real `lerobot` package (0.4.x: codebase v3.0; 0.3.x: v2.1) writes datasets; sfcache reads them and
joins targets.

Runs wherever `lerobot.datasets.lerobot_dataset` imports (it needs a torchvision that matches torch: on
CPU-only torch 2.13 PyPI has only the CUDA torchvision build, so this module is skipped there and the
committed fixture in test_lerobot.py stands in). What it checks: frames, actions and state of datasets
written by LeRobotDataset.create / add_frame / save_episode (PNG and AV1 video cameras) read back by
sfcache's source; WithTargets over a real LeRobotDataset with delta_timestamps and episodes=, in fork and
spawn DataLoader workers, and the index join after LeRobot's own batch -> transition -> batch converters.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from lerobot.datasets.lerobot_dataset import CODEBASE_VERSION, LeRobotDataset
except Exception as err:  # ImportError, or torchvision's RuntimeError on a mismatched build
    pytest.skip(f"lerobot not importable here ({type(err).__name__}: {err})", allow_module_level=True)
try:  # lerobot >= 0.4: the converters its policy preprocessors run
    from lerobot.processor.converters import batch_to_transition, transition_to_batch
except ImportError:
    batch_to_transition = None

from sfcache.errors import StoreError
from sfcache.sources import open_source
from sfcache.sources.synthetic import render_view
from sfcache.torch import CachedTargets, WithTargets
from tests._train_helpers import write_store

LENGTHS = (4, 6, 5)


def write_real(root: Path, video: bool, lengths=LENGTHS, seed: int = 0) -> list[tuple]:
    """A dataset written by lerobot itself; returns per episode (high, wrist, state, action)."""
    camera = {"shape": (32, 32, 3), "names": ["height", "width", "channels"]}
    features = {
        "observation.images.cam_high": {"dtype": "video" if video else "image", **camera},
        "observation.images.cam_left_wrist": {"dtype": "image", **camera},
        "observation.state": {"dtype": "float32", "shape": (5,), "names": None},
        "action": {"dtype": "float32", "shape": (3,), "names": None},
    }
    dataset = LeRobotDataset.create("sfcache/test", fps=10, features=features, root=root, use_videos=video)
    rng, episodes = np.random.default_rng(seed), []
    for episode, length in enumerate(lengths):
        high = np.stack([render_view(0, np.array([0.2 + 0.1 * t, 0.5]), 32, 32) for t in range(length)])
        wrist = rng.integers(0, 256, (length, 32, 32, 3), dtype=np.uint8)
        state = rng.normal(size=(length, 5)).astype(np.float32)
        action = rng.normal(size=(length, 3)).astype(np.float32)
        for t in range(length):
            frame = {
                "observation.images.cam_high": high[t],
                "observation.images.cam_left_wrist": wrist[t],
                "observation.state": state[t],
                "action": action[t],
            }
            if CODEBASE_VERSION == "v2.1":  # lerobot 0.3 takes the task apart
                dataset.add_frame(frame, task=f"task {episode % 2}")
            else:
                dataset.add_frame({**frame, "task": f"task {episode % 2}"})
        dataset.save_episode()
        episodes.append((high, wrist, state, action))
    if CODEBASE_VERSION != "v2.1":
        dataset.finalize()
    return episodes


def test_source_reads_what_lerobot_wrote(tmp_path):
    import av

    episodes = write_real(tmp_path / "ds", video=True)
    source = open_source(tmp_path / "ds")
    assert source.views == ("cam_high", "cam_left_wrist")
    sequential = []  # every frame of every file (v2.1: one per episode)
    for file in sorted((tmp_path / "ds").rglob("*.mp4")):
        with av.open(str(file)) as container:
            sequential += [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    first = 0
    for info, (high, wrist, state, action) in zip(source.episodes(), episodes):
        steps = source.read(info.key)
        np.testing.assert_array_equal(steps.frames[:, 1], wrist)
        np.testing.assert_array_equal(steps.frames[:, 0], np.stack(sequential[first : first + len(high)]))
        assert np.abs(steps.frames[:, 0].astype(int) - high).mean() < 12
        np.testing.assert_array_equal(steps.proprio, state)
        np.testing.assert_array_equal(steps.actions, action)
        first += len(high)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    write_real(root / "ds", video=False)
    return root / "ds", write_store(root / "store", root / "ds")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_with_targets_over_lerobot_dataset(real_store, context):
    root, store = real_store
    targets = CachedTargets(store)
    # lerobot 0.3 indexes its episode table by episode index with delta_timestamps: only prefixes work there
    chosen = [0, 2] if CODEBASE_VERSION != "v2.1" else [0, 1]
    dataset = LeRobotDataset("sfcache/test", root=root, delta_timestamps={"action": [0.0, 0.1, 0.2]}, episodes=chosen)
    joined = WithTargets(dataset, targets, index="index")
    loader = torch.utils.data.DataLoader(
        joined, batch_size=3, shuffle=True, num_workers=2, multiprocessing_context=multiprocessing.get_context(context)
    )
    seen = []
    for batch in loader:
        keys = [f"episode_{int(e):06d}" for e in batch["episode_index"]]
        assert torch.equal(batch["sf_targets"], targets.targets_for(keys, batch["frame_index"]))
        assert batch["action"].shape[1:] == (3, 3) and batch["action_is_pad"].shape[1:] == (3,)
        if batch_to_transition is not None:
            processed = transition_to_batch(batch_to_transition(batch))  # LeRobot's preprocessor round trip
            assert "sf_targets" not in processed and "index" in processed
            assert torch.equal(joined.targets_for(processed), batch["sf_targets"])
        seen += keys
    assert sorted(set(seen)) == [f"episode_{i:06d}" for i in chosen] and len(seen) == sum(LENGTHS[i] for i in chosen)


def test_join_refuses_a_store_of_other_lengths(real_store, tmp_path):
    root, _ = real_store
    write_real(tmp_path / "other", video=False, lengths=(4, 5, 5))
    other = CachedTargets(write_store(tmp_path / "store", tmp_path / "other"))
    with pytest.raises(StoreError, match="episode_000001 has 5 steps in the store, 6 in the dataset"):
        WithTargets(LeRobotDataset("sfcache/test", root=root), other, index="index")
