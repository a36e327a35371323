"""Closed-loop evaluation in the LIBERO simulator with OpenVLA-OFT's protocol, for any policy.

The protocol (OpenVLA-OFT `experiments/robot/libero/run_libero_eval.py`, used by Spatial Forcing): each
task's fixed init states (trial k uses init state k), `env.seed(0)`, 10 no-op steps for objects to
settle, a per-suite step limit, 256 px renders turned 180 degrees (as the training data), action chunks
executed open loop, and success is the environment's own goal check (`done`).

A policy is any callable `policy(observation) -> actions [chunk, 7]` in LIBERO's action convention
(gripper -1 open, +1 close); the helpers below do the preprocessing OFT-style policies need. Results go
to OUT/results.jsonl one line per episode as it ends, so a run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sfcache.errors import Message, SfcacheError, field_of, raise_problems
from sfcache.libero_results import EvalSummary, success_summary
from sfcache.libero_sim import (
    RESOLUTION,
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
from sfcache.vggt.preprocess import resize_like_rlds

__all__ = [
    "MAX_STEPS",
    "WAIT_STEPS",
    "NOOP",
    "Observation",
    "LiberoPolicy",
    "EpisodeResult",
    "EvalConfig",
    "run_episode",
    "evaluate",
    "observation_from_env",
    "quat_to_axis_angle",
    "jpeg_roundtrip",
    "resize_for_policy",
    "center_crop",
    "normalize_gripper",
    "invert_gripper",
    "write_video",
]

MAX_STEPS = {"spatial": 220, "object": 280, "goal": 300, "10": 520}  # OFT: longest training demo + margin
WAIT_STEPS = 10
NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # no motion, gripper open
RESULTS, SUMMARY, CONFIG = "results.jsonl", "summary.json", "eval_config.json"


# ----------------------------------------------------------------------------- observation and preprocessing


@dataclass(frozen=True)
class Observation:
    """What a policy sees: renders turned 180 degrees like the training data, LIBERO proprio, instruction.

    images: view -> uint8 [H, W, 3] ("primary" = agentview, "wrist" = eye-in-hand);
    proprio: float32 [8] = eef position (3) + axis-angle (3) + gripper joint positions (2), as the
    datasets' `state`; raw: the environment's observation dict, for policies that need more.
    """

    images: dict[str, np.ndarray]
    proprio: np.ndarray
    instruction: str
    raw: dict = field(repr=False, default_factory=dict)


class LiberoPolicy(Protocol):
    """Any callable from an observation to an action chunk [chunk, 7] (LIBERO convention: gripper -1 open,
    +1 close). The chunk is executed open loop before the policy is asked again."""

    def __call__(self, observation: Observation) -> np.ndarray: ...


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle (robosuite's convention, as the LIBERO datasets)."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    sine = math.sqrt(1.0 - w * w)
    if math.isclose(sine, 0.0):
        return np.zeros(3)
    return np.asarray(quat[:3], dtype=np.float64) * 2.0 * math.acos(w) / sine


def observation_from_env(obs: dict, instruction: str) -> Observation:
    """The env's observation dict -> Observation (renders are stored upside down: turn them 180 degrees)."""
    images = {
        "primary": np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]),
        "wrist": np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1]),
    }
    proprio = np.concatenate(
        [obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]]
    ).astype(np.float32)
    return Observation(images, proprio, instruction, obs)


def jpeg_roundtrip(image: np.ndarray, quality: int = 95, fast_dct: bool = True) -> np.ndarray:
    """JPEG-encode and decode uint8 [H, W, 3] as OFT's eval does to match RLDS-stored frames
    (TF's encode_jpeg: quality 95, 4:2:0). `fast_dct`: decode with the fast IDCT as TF does, for a policy
    trained on TF-decoded frames; False for one trained on frames decoded with libjpeg's accurate IDCT."""
    import simplejpeg

    data = simplejpeg.encode_jpeg(
        np.ascontiguousarray(image), quality=quality, colorspace="RGB", colorsubsampling="420"
    )
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast_dct)


def resize_for_policy(image: np.ndarray, size: int = 224) -> np.ndarray:
    """OFT's `resize_image_for_policy`: JPEG round trip, then TF lanczos3 + antialias to size x size."""
    return resize_like_rlds(jpeg_roundtrip(image)[None], size, size)[0]


def center_crop(image: np.ndarray, area: float = 0.9) -> np.ndarray:
    """The central `area` of uint8 [H, W, 3], resized back to H x W bilinearly as tf.image.crop_and_resize
    (OFT's eval crop for policies trained with random-crop augmentation), then truncated x * 255.5."""
    height, width = image.shape[:2]
    side = math.sqrt(area)
    lo = (1.0 - side) / 2

    def coordinates(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        points = lo * (size - 1) + np.arange(size) * side  # TF: y1*(H-1) + i*(y2-y1)*(H-1)/(H-1)
        below = np.floor(points).astype(int)
        return below, np.minimum(below + 1, size - 1), (points - below).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = coordinates(height), coordinates(width)
    pixels = image.astype(np.float32) / 255.0
    top = pixels[y0][:, x0] + (pixels[y0][:, x1] - pixels[y0][:, x0]) * fx[None, :, None]
    bottom = pixels[y1][:, x0] + (pixels[y1][:, x1] - pixels[y1][:, x0]) * fx[None, :, None]
    out = np.clip(top + (bottom - top) * fy[:, None, None], 0.0, 1.0)
    return (out * 255.5).astype(np.uint8)


def normalize_gripper(actions: np.ndarray, low: float = 0.0, high: float = 1.0, binarize: bool = True) -> np.ndarray:
    """Map the gripper (last) dimension from [low, high] to [-1, +1], then to its sign (OFT: RLDS's [0, 1])."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = 2 * (out[..., -1] - low) / (high - low) - 1
    if binarize:
        out[..., -1] = np.sign(out[..., -1])
    return out


def invert_gripper(actions: np.ndarray) -> np.ndarray:
    """Flip the gripper sign: RLDS's +1 = open becomes LIBERO's -1 = open."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] *= -1.0
    return out


# ----------------------------------------------------------------------------- the loop


@dataclass
class EpisodeResult:
    success: bool
    steps: int  # policy steps taken (the wait steps not counted)
    seconds: float  # wall time of the episode, reset and wait steps included
    sim_steps: int  # env.step calls, wait steps included
    frames: list[np.ndarray] = field(default_factory=list, repr=False)  # primary view per policy step
    error: str | None = None  # why the episode ended early as a failure (non-finite actions, a simulator error)


def _check_chunk(chunk: Any) -> np.ndarray:
    actions = np.asarray(chunk, dtype=np.float64)
    if actions.ndim == 1:
        actions = actions[None]
    if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) == 0:
        raise SfcacheError(f"the policy returned actions of shape {tuple(np.shape(chunk))}; expected [chunk, 7]")
    return actions


def run_episode(
    env,
    policy: LiberoPolicy,
    instruction: str,
    init_state: np.ndarray,
    max_steps: int,
    wait_steps: int = WAIT_STEPS,
    record: bool = False,
    on_step: Callable[[int], None] | None = None,
    replan_steps: int | None = None,
) -> EpisodeResult:
    """One episode: reset to `init_state`, wait, then chunks open loop until `done` (success) or `max_steps`;
    the first `replan_steps` actions of each chunk run before the policy is asked again (None: all of them);
    `on_step(steps)` after each policy step (progress within an episode)."""
    began = time.perf_counter()
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(wait_steps):  # objects settle; success is not counted here (as OFT)
        obs, _, _, _ = env.step(NOOP.tolist())
    queue: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    steps, success, error = 0, False, None
    while steps < max_steps:
        observation = observation_from_env(obs, instruction)
        if record:
            frames.append(observation.images["primary"])
        if not queue:
            chunk = _check_chunk(policy(observation))  # a wrong shape is a policy bug: it stops the run
            if not np.isfinite(chunk).all():
                error = f"the policy returned NaN or Inf actions at step {steps}"
                break
            queue = list(chunk[:replan_steps])
        try:
            obs, _, done, _ = env.step(queue.pop(0).tolist())
        except Exception as exc:  # noqa: BLE001  an unstable simulation ends this episode as a failure, as in OFT
            error = f"the simulator failed at step {steps}: {type(exc).__name__}: {exc}"
            break
        steps += 1
        if on_step is not None:
            on_step(steps)
        if done:
            success = True
            break
    return EpisodeResult(success, steps, time.perf_counter() - began, wait_steps + steps, frames, error)


def write_video(frames: list[np.ndarray], path: Path, fps: int = 20) -> Path:
    """MP4 through imageio's ffmpeg plugin when installed, else an animated GIF next to it; returns the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the MP4 writer)
    except ImportError:
        from PIL import Image

        gif = path.with_suffix(".gif")
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return gif
    with imageio.get_writer(path, fps=fps, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def _parse_tasks(text: str) -> tuple[int, ...]:
    """'0,3,5' or '0-4' -> task indices."""
    chosen: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            chosen += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError("expected task indices like 0,3,5 or 0-4") from None
    return tuple(chosen)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate (each option field's help is its `sf eval-libero` option's)."""

    suite: str = option(help=" | ".join(SUITES))
    out: Path = option(help="Results folder (default: RUN/eval_libero_<suite>); resumes the episodes it already holds.")
    tasks: tuple[int, ...] | None = option(
        None, "Task indices, e.g. 0,3,5 or 0-4 (default: all 10).", parse=_parse_tasks, show=comma_text
    )
    trials_per_task: int = option(50, "Episodes per task, on LIBERO's fixed init states 0..N-1.")
    seed: int = option(7, "Seed of the evaluation (OFT: 7).")
    video: int = option(1, "Save rollout videos of the first N trials of each task.")
    max_steps: int | None = option(
        None,
        "Policy steps per episode (default: the protocol's "
        + ", ".join(f"{s} {n}" for s, n in MAX_STEPS.items())
        + "); shorter only for quick checks.",
    )
    replan_steps: int | None = option(
        None,
        "Actions run from each predicted chunk before the policy is asked again (default: the whole chunk, "
        "as OpenVLA-OFT; openpi's LIBERO client runs 5).",
    )
    resolution: int = RESOLUTION
    wait_steps: int = WAIT_STEPS

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        named = partial(field_of, EvalConfig)
        check_suite(self.suite, named("suite"))
        problems = []
        if self.trials_per_task < 1:
            problems.append(Message(named("trials_per_task"), f" must be >= 1, got {self.trials_per_task}"))
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(Message(named("max_steps"), f" must be >= 1, got {self.max_steps}"))
        if self.video < 0:
            problems.append(Message(named("video"), f" must be >= 0, got {self.video}"))
        if self.replan_steps is not None and self.replan_steps < 1:
            problems.append(Message(named("replan_steps"), f" must be >= 1, got {self.replan_steps}"))
        if self.tasks is not None:
            problems += task_index_problems(self.tasks, named("tasks"))
        if self.out.is_file():
            problems.append(Message(named("out"), f" {self.out}: is a file; expected a results folder"))
        raise_problems(problems)

    @property
    def step_limit(self) -> int:
        return self.max_steps if self.max_steps is not None else MAX_STEPS[self.suite]


def _check_config(config: EvalConfig, tasks: list[Task]) -> list[Task]:
    """The tasks to run; SfcacheError when the suite's own tasks and init states cannot serve `config`."""
    problems = []
    available = min(len(t.init_states) for t in tasks)
    if config.trials_per_task > available:
        problems.append(
            Message(
                field_of(EvalConfig, "trials_per_task"),
                f" {config.trials_per_task}: the suite has {available} fixed init states per task",
            )
        )
    chosen = list(config.tasks) if config.tasks is not None else [t.index for t in tasks]
    problems += missing_task_problems(chosen, config.suite, len(tasks), field_of(EvalConfig, "tasks"))
    raise_problems(problems)
    return [tasks[i] for i in dict.fromkeys(chosen)]


def _read_results(path: Path) -> dict[tuple[int, int], dict]:
    """Finished episodes by (task index, trial); a torn last line (killed while writing) is dropped."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(record["task_id"], record["trial"])] = record
    return done


def _drop_torn_line(path: Path) -> None:
    """Cut a last line a kill left unfinished, so the next record starts on a line of its own."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


def _start(config: EvalConfig, policy_info: dict) -> None:
    """Record what this folder evaluates; a resume with another policy or protocol is refused."""
    asked = {
        "suite": config.suite,
        "seed": config.seed,
        "step_limit": config.step_limit,
        "resolution": config.resolution,
        "wait_steps": config.wait_steps,
        "replan_steps": config.replan_steps,  # absent in older folders: None, the whole chunk
        "policy": policy_info,
    }
    path = config.out / CONFIG
    if path.exists():
        had = json.loads(path.read_text())
        diff = {k: (had.get(k), v) for k, v in json.loads(json.dumps(asked)).items() if had.get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: folder has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise SfcacheError(
                Message(
                    f"{config.out}: holds results of another evaluation ({lines}); use another ",
                    field_of(EvalConfig, "out"),
                )
            )
    config.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asked, indent=1))


def _seed(seed: int, task: int, trial: int) -> None:
    """Per-episode seeds of Python's and NumPy's generators, so a resumed run equals an uninterrupted one."""
    value = seed * 1_000_003 + task * 1_009 + trial
    random.seed(value)
    np.random.seed(value % 2**32)


def evaluate(policy: LiberoPolicy, config: EvalConfig, policy_info: dict | None = None) -> EvalSummary:
    """Run every (task, trial) not yet in OUT/results.jsonl, then write and return OUT/summary.json."""
    tasks = _check_config(config, suite_tasks(config.suite))
    _start(config, policy_info or {})
    results_path = config.out / RESULTS
    done = _read_results(results_path)
    _drop_torn_line(results_path)
    todo = [(t, trial) for t in tasks for trial in range(config.trials_per_task) if (t.index, trial) not in done]
    total = len(tasks) * config.trials_per_task
    with progress_bar(unit="episodes") as bar, results_path.open("a") as log:
        job = bar.add_task(f"{SUITES[config.suite]}", total=total, completed=total - len(todo))
        within = bar.add_task("episode", total=config.step_limit, visible=False, unit="steps")  # the running one
        for task in tasks:
            trials = [trial for t, trial in todo if t is task]
            if not trials:
                continue
            env = make_env(task, config.resolution)
            try:
                for trial in trials:
                    _seed(config.seed, task.index, trial)
                    bar.reset(within, description=f"task {task.index} trial {trial}", visible=True)
                    env.seed(0)
                    result = run_episode(
                        env,
                        policy,
                        task.instruction,
                        task.init_states[trial],
                        config.step_limit,
                        config.wait_steps,
                        record=trial < config.video,
                        on_step=lambda steps: bar.update(within, completed=steps),
                        replan_steps=config.replan_steps,
                    )
                    record = {
                        "task": task.instruction,
                        "task_id": task.index,
                        "trial": trial,
                        "success": result.success,
                        "steps": result.steps,
                        "seconds": round(result.seconds, 3),
                        "sim_steps": result.sim_steps,
                    }
                    if result.error:
                        record["error"] = result.error
                    if result.frames:
                        outcome = "success" if result.success else "failure"
                        video = write_video(
                            result.frames,
                            config.out / "videos" / f"task{task.index:02d}_trial{trial:02d}_{outcome}.mp4",
                        )
                        record["video"] = video.relative_to(config.out).as_posix()
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                    done[(task.index, trial)] = record
                    bar.update(
                        job,
                        advance=1,
                        description=f"{SUITES[config.suite]} task {task.index} "
                        f"{sum(r['success'] for r in done.values())}/{len(done)} ok",
                    )
            finally:
                env.close()
    chosen = [done[(t.index, trial)] for t in tasks for trial in range(config.trials_per_task)]
    summary = success_summary(chosen, config, policy_info or {})
    (config.out / SUMMARY).write_text(json.dumps(asdict(summary), indent=1))
    return summary
