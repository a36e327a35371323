"""`sf render-depth`: metric depth for an existing LIBERO HDF5 dataset, by replaying its stored states.

Each demonstration's `model_file` XML is loaded and each of its `states` rendered (`sfcache.libero_replay`,
the code `sf collect-libero` renders with); the output is the same dataset, file for file and key for key,
plus obs/agentview_depth and obs/eye_in_hand_depth (float16 [T, H, W] metres, rows upside down like the
RGB), so every reader reads it as it reads `sf collect-libero --depth` output. The replayed RGB is compared
with the stored RGB (the report says how many pixels differ), which tells whether the states and frames
of the dataset pair up as assumed.

Resuming: each output file is written to a temp file and renamed when complete; files already in OUT are
skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from sfcache.errors import Message, SfcacheError, SourceError, field_of, raise_problems
from sfcache.libero_replay import CAMERAS, DEPTH_KEY, RGB_KEY, render_states
from sfcache.libero_sim import Task, make_env, suite_tasks
from sfcache.options import option
from sfcache.progress import progress_bar

REPORT = "render_depth_report.json"
COMPRESSION = {"compression": "gzip", "compression_opts": 4}


@dataclass(frozen=True)
class RenderDepthConfig:
    """What to render (each option field's help is its `sf render-depth` option's)."""

    dataset: Path = option(help="A LIBERO HDF5 dataset: a <task>_demo.hdf5 file or a folder of them.", argument=True)
    out: Path = option(help="Output folder: the dataset's files at the same relative paths, with depth added.")

    def __post_init__(self):
        object.__setattr__(self, "dataset", Path(self.dataset))
        object.__setattr__(self, "out", Path(self.out))
        out = field_of(RenderDepthConfig, "out")
        problems = []
        if not self.dataset.exists():
            problems.append(f"{self.dataset}: no such file or folder")
        if self.out.is_file():
            problems.append(Message(out, f" {self.out}: is a file; expected a folder"))
        elif self.out.resolve() == (self.dataset if self.dataset.is_dir() else self.dataset.parent).resolve():
            problems.append(Message(out, f" {self.out}: is the dataset's own folder; choose another"))
        raise_problems(problems)


@dataclass(frozen=True)
class FileReport:
    """One file: demos and frames rendered, and how the replayed RGB compares with the stored RGB."""

    file: str
    demos: int
    frames: int
    rgb_pixels_differing: float  # fraction of pixels with any channel different, both views
    rgb_pixels_off_by_more_than_10: float
    agentview_depth_m: list[float]  # [min, max]
    eye_in_hand_depth_m: list[float]


def _files(dataset: Path) -> list[Path]:
    files = [dataset] if dataset.is_file() else sorted(dataset.rglob("*.hdf5"))
    if not files:
        raise SfcacheError(f"{dataset}: no .hdf5 files (expected LIBERO's <suite>/<task>_demo.hdf5)")
    return files


def _demos(file: Path, h5: h5py.File) -> list[str]:
    data = h5.get("data")
    if not isinstance(data, h5py.Group):
        raise SourceError(file, "missing group (expected LIBERO demos under data/)", key="data")
    demos = sorted((name for name in data if name.startswith("demo_")), key=lambda n: int(n.split("_")[1]))
    for name in demos:
        if "model_file" not in data[name].attrs:
            raise SourceError(
                file, "no model_file attribute (expected LIBERO's original HDF5 with the scene XML)", key=f"data/{name}"
            )
        if "states" not in data[name]:
            raise SourceError(
                file, "missing dataset (expected the flattened simulator states)", key=f"data/{name}/states"
            )
    return demos


def _task(file: Path, h5: h5py.File, tasks: dict[str, Task]) -> Task:
    """The suite task of a file, by its bddl file's name (the stored path is the recording machine's)."""
    stored = h5["data"].attrs.get("bddl_file_name")
    name = Path(str(stored)).name if stored is not None else file.name.removesuffix("_demo.hdf5") + ".bddl"
    if name not in tasks:
        raise SourceError(file, f"bddl file {name} is not a task of the installed LIBERO suites", key="data.attrs")
    return tasks[name]


def _installed_tasks() -> dict[str, Task]:
    from sfcache.libero_sim import SUITES

    return {Path(task.bddl_file).name: task for suite in SUITES for task in suite_tasks(suite)}


def render_depth(config: RenderDepthConfig) -> list[FileReport]:
    """Write every dataset file not yet in OUT with depth added; return a report per file (earlier runs' kept)."""
    files = _files(config.dataset)
    root = config.dataset if config.dataset.is_dir() else config.dataset.parent
    report_path = config.out / REPORT
    reports = {r["file"]: r for r in json.loads(report_path.read_text())} if report_path.exists() else {}
    todo = [f for f in files if not (config.out / f.relative_to(root)).exists()]
    tasks = _installed_tasks() if todo else {}
    plan = []
    for file in todo:
        with h5py.File(file, "r") as h5:
            demos = _demos(file, h5)
            plan.append((file, _task(file, h5, tasks), demos, sum(h5["data"][d]["states"].shape[0] for d in demos)))
    with progress_bar(unit="frames") as bar:
        job = bar.add_task("render-depth", total=sum(p[3] for p in plan))
        for file, task, demos, _ in plan:
            target = config.out / file.relative_to(root)
            report = _render_file(file, target, task, demos, lambda n: bar.update(job, advance=n))
            reports[report.file] = asdict(report)
            config.out.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(list(reports.values()), indent=1))
    return [FileReport(**r) for r in reports.values()]


def _render_file(file: Path, target: Path, task: Task, demos: list[str], advance) -> FileReport:
    with h5py.File(file, "r") as h5:
        size = h5["data"][demos[0]][RGB_KEY.format("agentview")].shape[1]
    env = make_env(task, size, depth=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    differing, off, frames = 0.0, 0.0, 0
    ranges: dict[str, list[float]] = {view: [np.inf, -np.inf] for view in CAMERAS}
    try:
        with h5py.File(file, "r") as source, h5py.File(temporary, "w") as out:
            for key, value in source.attrs.items():
                out.attrs[key] = value
            for name in source:
                source.copy(source[name], out, name=name)
            for demo in demos:
                group = source["data"][demo]
                states = group["states"][:]
                rendered = render_states(env, states, True, xml=group.attrs["model_file"], advance=advance)
                for view in CAMERAS:
                    stored = group[RGB_KEY.format(view)][:]
                    replayed = rendered.rgb[view]
                    if stored.shape != replayed.shape:
                        raise SourceError(
                            file,
                            f"{stored.shape} frames for {len(states)} states",
                            key=f"data/{demo}/{RGB_KEY.format(view)}",
                        )
                    gap = np.abs(stored.astype(np.int16) - replayed)
                    differing += float((gap > 0).any(axis=-1).sum())
                    off += float((gap > 10).any(axis=-1).sum())
                    depth = rendered.depth[view]
                    ranges[view] = [min(ranges[view][0], float(depth.min())), max(ranges[view][1], float(depth.max()))]
                    name = f"data/{demo}/{DEPTH_KEY.format(view)}"
                    if name in out:
                        del out[name]
                    out.create_dataset(name, data=depth, chunks=(1, *depth.shape[1:]), **COMPRESSION)
                frames += len(states)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
        env.close()
    pixels = frames * size * size * len(CAMERAS)
    return FileReport(
        file=str(file),
        demos=len(demos),
        frames=frames,
        rgb_pixels_differing=differing / pixels,
        rgb_pixels_off_by_more_than_10=off / pixels,
        agentview_depth_m=ranges["agentview"],
        eye_in_hand_depth_m=ranges["eye_in_hand"],
    )
