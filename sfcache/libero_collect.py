"""`sf collect-libero`: scripted demonstrations recorded in the LIBERO simulator, written as LIBERO HDF5.

Each attempt starts from a fresh random placement (`env.reset()`, never the benchmark's evaluation init
states), waits 10 no-op steps for objects to settle (as the evaluation does), then runs the scripted
controller (`sfcache.libero_control`) with the cameras off (~18 ms a step). Only attempts the environment's
own goal check calls a success are kept; those are then rendered by replaying their states
(`sfcache.libero_replay`), which gives the frames live rendering would have given at a fraction of the cost
of rendering every searched step.

With `--action-noise S` (DART-style noise injection) the environment executes the controller's action plus
Gaussian noise of standard deviation S on its three position components (clipped to [-1, 1]), while the
file's `actions` hold the controller's own action at each step: the correction a demonstrator makes from
wherever the noise pushed the arm. A policy trained on them has seen states off the clean path and how to
get back, and the controller's re-grasps after a missed grasp; replaying `states` is unaffected, but
re-executing `actions` does not retrace the episode.

Layout (LIBERO's own, one file per task): OUT/<libero_suite>/<task>_demo.hdf5 with data/demo_<i>/
{actions, states, robot_states, rewards, dones, obs/{agentview_rgb, eye_in_hand_rgb, ee_states, ee_pos,
ee_ori, gripper_states, joint_states}} and, with depth, obs/agentview_depth and obs/eye_in_hand_depth
(float16 [T, H, W] metres, rows upside down like the RGB). Step k is what the controller saw when it
chose action k: `states[k]` is the state its observation shows (`libero_replay.observed_state`), and the
frames are renders of it, equal to the live camera frames. Images are stored upside down as LIBERO does.

Resuming: every kept demonstration is first written to its own file under
OUT/.collect/<libero_suite>/<task>/ (temp file, then rename), and every attempt is logged there; a task's
`_demo.hdf5` is assembled (temp file, then rename) once it has all its demonstrations. A killed run leaves
no half-written file, and a re-run fills in the missing demonstrations.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import h5py
import numpy as np
from rich.table import Table

from sfcache.errors import Message, SfcacheError, field_of, raise_problems
from sfcache.libero_control import PickPlace, UnsupportedTask, goal_of
from sfcache.libero_eval import NOOP, WAIT_STEPS, _parse_tasks, quat_to_axis_angle
from sfcache.libero_replay import (
    CAMERAS,
    DEPTH_KEY,
    RGB_KEY,
    forget_model,
    model_xml,
    observed_state,
    render_states,
    set_cameras,
    track_observed_state,
)
from sfcache.libero_sim import (
    SUITES,
    Task,
    check_suite,
    make_env,
    missing_task_problems,
    suite_tasks,
    task_index_problems,
)
from sfcache.options import comma_text, option
from sfcache.progress import progress_bar

STAGING = ".collect"
ATTEMPTS = "attempts.jsonl"
SETTINGS = "settings.json"
ATTRS = "attrs.json"  # the task file's data-group attributes, kept until the file is assembled
PART = ".demo"  # staged demonstration files (not .hdf5, so dataset readers never see them)
COMPRESSION = {"compression": "gzip", "compression_opts": 4}


def _parse_resolution(text: str) -> int:
    value = int(text)
    if value not in (128, 256):
        raise ValueError("expected 128 or 256")
    return value


@dataclass(frozen=True)
class CollectConfig:
    """What to collect (each option field's help is its `sf collect-libero` option's)."""

    suite: str = option(help=" | ".join(SUITES))
    out: Path = option(help="Dataset folder: OUT/<libero_suite>/<task>_demo.hdf5; a re-run fills in what is missing.")
    tasks: tuple[int, ...] = option((0,), "Task indices, e.g. 0,3,5 or 0-4.", parse=_parse_tasks, show=comma_text)
    episodes: int = option(10, "Successful demonstrations per task.")
    resolution: int = option(
        128, "Camera size in pixels: 128 (LIBERO's datasets) or 256.", parse=_parse_resolution, show=str
    )
    depth: bool = option(False, "Also store metric depth (obs/agentview_depth, obs/eye_in_hand_depth: float16 metres).")
    seed: int = option(0, "Seed of the placements (attempt k of task t is seeded from seed, t and k).")
    max_steps: int = option(300, "Control steps per attempt before it counts as a failure.")
    max_attempts: int | None = option(None, "Attempts per task before giving up (default: 3 x episodes + 10).")
    action_noise: float = option(
        0.0,
        "Std of Gaussian noise added to the executed position actions (DART); the file stores the controller's "
        "clean actions. 0: none.",
    )

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        named = partial(field_of, CollectConfig)
        check_suite(self.suite, named("suite"))
        problems = []
        for name in ("episodes", "max_steps"):
            if getattr(self, name) < 1:
                problems.append(Message(named(name), f" must be >= 1, got {getattr(self, name)}"))
        if not 0.0 <= self.action_noise <= 1.0:
            problems.append(Message(named("action_noise"), f" must be in [0, 1], got {self.action_noise}"))
        if self.max_attempts is not None and self.max_attempts < 1:
            problems.append(Message(named("max_attempts"), f" must be >= 1, got {self.max_attempts}"))
        problems += task_index_problems(self.tasks, named("tasks"))
        if self.out.is_file():
            problems.append(Message(named("out"), f" {self.out}: is a file; expected a dataset folder"))
        raise_problems(problems)

    @property
    def attempt_limit(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 3 * self.episodes + 10

    def recorded(self) -> dict:
        """What every file of one dataset must share (a resume with other settings is refused)."""
        return {
            "suite": self.suite,
            "resolution": self.resolution,
            "depth": self.depth,
            "seed": self.seed,
            "action_noise": self.action_noise,
        }


DEFAULTS = {f.name: f.default for f in fields(CollectConfig) if f.default is not MISSING}


# ----------------------------------------------------------------------------- one attempt


@dataclass
class Attempt:
    """One scripted episode searched with the cameras off."""

    success: bool
    reason: str | None  # why it failed
    steps: int
    seconds: float
    xml: str = field(repr=False)
    actions: np.ndarray = field(repr=False)
    states: np.ndarray = field(repr=False)
    proprio: dict[str, np.ndarray] = field(repr=False)


def _proprio(env, obs: dict) -> dict[str, np.ndarray]:
    ee = np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"])])
    return {
        "ee_states": ee,
        "gripper_states": np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),
        "joint_states": np.asarray(obs["robot0_joint_pos"], dtype=np.float64),
        "robot_states": env.env.get_robot_state_vector(obs),
    }


def search(env, max_steps: int, action_noise: float = 0.0, rng: np.random.Generator | None = None) -> Attempt:
    """Reset to a fresh random placement (LIBERO re-draws objects and fixtures), settle, run the controller with
    the cameras off; record the model XML, the controller's actions and, before each action, the state the
    controller's observation shows (`libero_replay.observed_state`) with that observation's proprio. With
    `action_noise`, what runs is the action plus noise on its position components (drawn from `rng`)."""
    rng = rng if rng is not None else np.random.default_rng()
    began = time.perf_counter()
    set_cameras(env, False)
    track_observed_state(env)
    obs = env.reset()
    env.env.hard_reset = False
    forget_model(env)
    xml = model_xml(env)  # the fixtures' placement of this attempt is in the model, not in the state
    for _ in range(WAIT_STEPS):
        obs, _, _, _ = env.step(NOOP.tolist())
    controller = PickPlace(env)
    states, actions, proprio = [], [], []
    done, reason = False, None
    while len(actions) < max_steps:
        states.append(observed_state(obs))
        proprio.append(_proprio(env, obs))
        action = controller(obs)
        actions.append(action)
        executed = action.copy()
        if action_noise:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, action_noise, 3), -1.0, 1.0)
        try:
            obs, _, done, _ = env.step(executed.tolist())
        except Exception as error:  # noqa: BLE001  an unstable simulation fails this attempt only
            reason = f"the simulator failed: {type(error).__name__}: {error}"
            break
        if done and controller.released:  # basket goals count while the object is still held: release first
            break
        if controller.finished:
            break
    success = bool(done) and reason is None
    if not success and reason is None:
        reason = controller.failure or (
            f"step budget {max_steps} ran out in phase {controller.phase}"
            if len(actions) >= max_steps
            else "the script ended without the goal"
        )
    return Attempt(
        success,
        None if success else reason,
        len(actions),
        time.perf_counter() - began,
        xml,
        np.asarray(actions, dtype=np.float64),
        np.asarray(states, dtype=np.float64),
        {key: np.stack([p[key] for p in proprio]) for key in proprio[0]} if proprio else {},
    )


# ----------------------------------------------------------------------------- files


def _write_atomically(path: Path, write) -> None:
    """write(h5py.File) into PATH.tmp, then rename: a kill leaves the old file or none, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(temporary, "w") as h5:
            write(h5)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_demo(group: h5py.Group, attempt: Attempt, frames) -> None:
    """One data/demo_<i> group in LIBERO's layout."""
    steps = attempt.steps
    group.create_dataset("actions", data=attempt.actions)
    group.create_dataset("states", data=attempt.states)
    group.create_dataset("robot_states", data=attempt.proprio["robot_states"])
    rewards = np.zeros(steps, dtype=np.uint8)
    rewards[-1] = 1
    group.create_dataset("rewards", data=rewards)
    group.create_dataset("dones", data=rewards.copy())
    obs = group.create_group("obs")
    ee = attempt.proprio["ee_states"]
    for name, data in (
        ("ee_states", ee),
        ("ee_pos", ee[:, :3]),
        ("ee_ori", ee[:, 3:]),
        ("gripper_states", attempt.proprio["gripper_states"]),
        ("joint_states", attempt.proprio["joint_states"]),
    ):
        obs.create_dataset(name, data=data)
    for view in CAMERAS:
        rgb = frames.rgb[view]
        group.create_dataset(RGB_KEY.format(view), data=rgb, chunks=(1, *rgb.shape[1:]), **COMPRESSION)
        if view in frames.depth:
            depth = frames.depth[view]
            group.create_dataset(DEPTH_KEY.format(view), data=depth, chunks=(1, *depth.shape[1:]), **COMPRESSION)
    group.attrs["num_samples"] = steps
    group.attrs["model_file"] = attempt.xml
    group.attrs["init_state"] = attempt.states[0]


def _file_attrs(env, task: Task, config: CollectConfig) -> dict:
    """The data-group attributes LIBERO's create_dataset.py writes, plus sfcache's collection settings."""
    domain = env.env
    problem = {
        "problem_name": domain.parsed_problem.get("problem_name", "unknown"),
        "domain_name": domain.parsed_problem.get("domain_name", "robosuite"),
        "language_instruction": task.instruction,
    }
    env_kwargs = {
        "bddl_file_name": task.bddl_file,
        "robots": ["Panda"],
        "controller": "OSC_POSE",
        "camera_names": ["robot0_eye_in_hand", "agentview"],
        "camera_heights": config.resolution,
        "camera_widths": config.resolution,
        "camera_depths": config.depth,
        "control_freq": domain.control_freq,
    }
    env_name = type(domain).__name__
    return {
        "env_name": env_name,
        "problem_info": json.dumps(problem),
        "macros_image_convention": "opengl",
        "bddl_file_name": task.bddl_file,
        "bddl_file_content": Path(task.bddl_file).read_text(),
        "env_args": json.dumps(
            {
                "type": 1,
                "env_name": env_name,
                "problem_name": problem["problem_name"],
                "bddl_file": task.bddl_file,
                "env_kwargs": env_kwargs,
            }
        ),
        "sfcache_collect": json.dumps(
            {**config.recorded(), "task": task.index, "controller": "libero_control.PickPlace"}
        ),
    }


def task_file(out: Path, task: Task) -> Path:
    return out / SUITES[task.suite] / f"{Path(task.bddl_file).stem}_demo.hdf5"


class TaskFolder:
    """A task's staging folder: staged demos, the attempt log and the settings they were made with."""

    def __init__(self, config: CollectConfig, task: Task):
        self.config, self.task = config, task
        self.final = task_file(config.out, task)
        self.path = config.out / STAGING / SUITES[task.suite] / self.final.name.removesuffix("_demo.hdf5")

    def check_settings(self) -> None:
        asked = self.config.recorded()
        recorded = None
        if self.final.exists():
            with h5py.File(self.final, "r") as h5:
                text = h5["data"].attrs.get("sfcache_collect")
                recorded = json.loads(text) if text else None
        elif (self.path / SETTINGS).exists():
            recorded = json.loads((self.path / SETTINGS).read_text())
        if recorded is not None:
            recorded = {**DEFAULTS, **recorded}  # files written before a setting existed had its default
            diff = [f"{k}: has {recorded.get(k)!r}, asked {v!r}" for k, v in asked.items() if recorded.get(k) != v]
            if diff:
                raise SfcacheError(
                    Message(
                        f"{self.final}: collected with other settings ({'; '.join(diff)}); use another ",
                        field_of(CollectConfig, "out"),
                    )
                )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / SETTINGS).write_text(json.dumps(asked))

    def finished_demos(self) -> int:
        if not self.final.exists():
            return 0
        with h5py.File(self.final, "r") as h5:
            return sum(1 for name in h5["data"] if name.startswith("demo_"))

    def staged(self) -> list[Path]:
        return sorted(self.path.glob(f"demo_*{PART}"), key=lambda p: int(p.name.split("_")[1].split(".")[0]))

    def attempts(self) -> list[dict]:
        log = self.path / ATTEMPTS
        records = []
        if log.exists():
            for line in log.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a kill while writing the last line
                    continue
        return records

    def log(self, record: dict) -> None:
        with (self.path / ATTEMPTS).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def stage(self, index: int, attempt: Attempt, frames) -> None:
        _write_atomically(self.path / f"demo_{index}{PART}", lambda h5: _write_demo(h5, attempt, frames))

    def save_attrs(self, attrs: dict) -> None:
        (self.path / ATTRS).write_text(json.dumps(attrs))

    def assemble(self) -> None:
        """OUT/<suite>/<task>_demo.hdf5 from its demos so far and the staged ones (temp file, then rename)."""
        staged = self.staged()
        attrs = json.loads((self.path / ATTRS).read_text())
        self.final.parent.mkdir(parents=True, exist_ok=True)

        def write(h5: h5py.File) -> None:
            data = h5.create_group("data")
            index, total = 0, 0
            sources = ([self.final] if self.final.exists() else []) + staged
            for source in sources:
                with h5py.File(source, "r") as part:
                    if "data" in part:
                        groups = [part["data"][n] for n in sorted(part["data"], key=lambda n: int(n.split("_")[1]))]
                    else:
                        groups = [part["/"]]
                    for group in groups:
                        part.copy(group, data, name=f"demo_{index}")
                        total += int(group.attrs["num_samples"])
                        index += 1
            for key, value in attrs.items():
                data.attrs[key] = value
            data.attrs["num_demos"] = index
            data.attrs["total"] = total

        _write_atomically(self.final, write)
        for path in staged:
            path.unlink()


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class TaskReport:
    """A task's collection: demonstrations kept, attempts, why attempts failed, time per attempt and demo."""

    suite: str
    task_id: int
    task: str
    demos: int
    attempts: int
    successes: int
    success_rate: float
    failures: dict[str, int]
    search_seconds_per_attempt: float
    render_seconds_per_demo: float
    file: str


def _task_named(config: CollectConfig, index: int) -> Message:
    """A task as the settings that choose it (`CollectConfig.suite spatial CollectConfig.tasks 3`)."""
    named = partial(field_of, CollectConfig)
    return Message(named("suite"), f" {config.suite} ", named("tasks"), f" {index}")


def check_tasks(config: CollectConfig, tasks: list[Task]) -> list[Task]:
    """The chosen tasks; one error naming every index that does not exist or whose goal has no script."""
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    problems = missing_task_problems(config.tasks, config.suite, len(tasks), field_of(CollectConfig, "tasks"))
    chosen = []
    for index in dict.fromkeys(i for i in config.tasks if 0 <= i < len(tasks)):
        goal = robosuite_parse_problem(tasks[index].bddl_file)["goal_state"]
        if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0].lower() not in ("on", "in"):
            problems.append(
                Message(
                    _task_named(config, index),
                    f" ({tasks[index].instruction}): goal {goal} has no script "
                    "(the controller picks one object and places it on or in another)",
                )
            )
        chosen.append(tasks[index])
    raise_problems(problems)
    return chosen


def _seed(config: CollectConfig, task: Task, attempt: int) -> np.random.Generator:
    """Seed LIBERO's placements (numpy's global generator); return the attempt's own generator for the noise."""
    seed = (config.seed * 1_000_003 + task.index * 10_007 + attempt) % 2**32
    np.random.seed(seed)
    return np.random.default_rng(seed)


def collect(config: CollectConfig) -> list[TaskReport]:
    """Collect every chosen task up to `episodes` demonstrations (resuming), return a report per task."""
    tasks = check_tasks(config, suite_tasks(config.suite))
    folders = [TaskFolder(config, task) for task in tasks]
    for folder in folders:
        folder.check_settings()
    reports = []
    with progress_bar(unit="demos") as bar:
        for folder in folders:
            reports.append(_collect_task(config, folder, bar))
    return reports


def _collect_task(config: CollectConfig, folder: TaskFolder, bar) -> TaskReport:
    task = folder.task
    have = folder.finished_demos() + len(folder.staged())
    attempts = folder.attempts()
    job = bar.add_task(
        f"{SUITES[task.suite]} {task.index}", total=config.episodes, completed=min(have, config.episodes)
    )
    env = None
    try:
        while have < config.episodes and len(attempts) < config.attempt_limit:
            if env is None:
                env = make_env(task, config.resolution, config.depth)
                goal_of(env)  # UnsupportedTask here would be a parser disagreement: one line, stops the run
                folder.save_attrs(_file_attrs(env, task, config))
            number = len(attempts)
            rng = _seed(config, task, number)
            attempt = search(env, config.max_steps, config.action_noise, rng)
            record = {
                "attempt": number,
                "success": attempt.success,
                "steps": attempt.steps,
                "search_s": round(attempt.seconds, 3),
            }
            if attempt.success:
                began = time.perf_counter()
                frames = render_states(env, attempt.states, config.depth, xml=attempt.xml)
                # the next attempt rebuilds the model from the task: in a model loaded from XML the
                # controller solved 6/12 spatial-1 placements instead of 19/20 (its resets place worse)
                env.env.hard_reset = True
                folder.stage(have, attempt, frames)
                record["render_s"] = round(time.perf_counter() - began, 3)
                have += 1
                bar.update(job, advance=1)
            else:
                record["reason"] = attempt.reason
            folder.log(record)
            attempts.append(record)
            bar.update(job, description=f"{SUITES[task.suite]} {task.index}: {have} demos / {len(attempts)} attempts")
        if folder.staged() and (have >= config.episodes or len(attempts) >= config.attempt_limit):
            folder.assemble()
    except UnsupportedTask as error:
        raise SfcacheError(Message(_task_named(config, task.index), f": {error}")) from None
    finally:
        if env is not None:
            env.close()
    return _report(config, folder, attempts)


def _report(config: CollectConfig, folder: TaskFolder, attempts: list[dict]) -> TaskReport:
    successes = [a for a in attempts if a["success"]]
    failures = Counter(a["reason"] for a in attempts if not a["success"])
    return TaskReport(
        suite=SUITES[config.suite],
        task_id=folder.task.index,
        task=folder.task.instruction,
        demos=folder.finished_demos() + len(folder.staged()),
        attempts=len(attempts),
        successes=len(successes),
        success_rate=len(successes) / len(attempts) if attempts else 0.0,
        failures=dict(failures.most_common()),
        search_seconds_per_attempt=float(np.mean([a["search_s"] for a in attempts])) if attempts else 0.0,
        render_seconds_per_demo=float(np.mean([a["render_s"] for a in successes])) if successes else 0.0,
        file=str(folder.final),
    )


def report_table(reports: list[TaskReport]) -> Table:
    table = Table("task", "demos", "controller success", "s/attempt", "s/render", title="sf collect-libero")
    for r in reports:
        table.add_row(
            f"{r.suite} {r.task_id}: {r.task}",
            str(r.demos),
            f"{r.successes}/{r.attempts} ({100 * r.success_rate:.0f}%)",
            f"{r.search_seconds_per_attempt:.1f}",
            f"{r.render_seconds_per_demo:.1f}",
        )
    return table


def write_report(config: CollectConfig, reports: list[TaskReport]) -> Path:
    """OUT/.collect/report_<suite>.json: these tasks' reports replace their earlier ones, other tasks' stay (tasks
    collected by separate processes share the file; each writes it whole, temp file then rename)."""
    path = config.out / STAGING / f"report_{SUITES[config.suite]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = {r.task_id: asdict(r) for r in reports}
    kept = [r for r in json.loads(path.read_text()) if r["task_id"] not in fresh] if path.exists() else []
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(sorted([*kept, *fresh.values()], key=lambda r: r["task_id"]), indent=1))
    os.replace(temporary, path)
    return path
