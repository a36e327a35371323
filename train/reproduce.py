"""`make reproduce-libero`: the whole Spatial Forcing pipeline over the four LIBERO suites, with a report.

Per suite: extract a target cache once, train the policy with SF (alpha 0.5) and the baseline without
(alpha 0), read validation action L1 on held-out episodes, evaluate both in the LIBERO simulator when it
is installed (`sf eval-libero`'s loop, OpenVLA-OFT's protocol), probe both policies' tokens for depth when
`--probe-dir` holds the suite with depth (`sf probe`), then write report.md / report.json and
plots per suite. Every input is checked before any work starts. Every stage resumes: the extractor
fills in unfinished shards, the trainer continues from its checkpoint, and a stage counts as done
only when its outputs say so (a complete store, a checkpoint at the last step), never by a marker.
Run it as `sf reproduce-libero` (sfcache/cli/reproduce.py) or `make reproduce-libero`.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from sfcache.device import DEVICE_CHOICES, check_device, resolve_device
from sfcache.errors import (
    ConfigMismatch,
    Message,
    SfcacheError,
    SourceError,
    StoreError,
    WeightsError,
    differences,
    field_of,
)
from sfcache.extract import ExtractConfig, extract
from sfcache.inspection import summarize
from sfcache.libero_eval import EvalConfig, evaluate
from sfcache.libero_sim import RESOLUTION, simulator_available
from sfcache.options import (
    comma_list,
    comma_text,
    handed_on,
    option,
    option_like,
    same_fields,
    user_path,
)
from sfcache.probe import MEAN_DEPTH
from sfcache.probe.metrics import figure
from sfcache.provenance import dataset_differences, identity_fields
from sfcache.sources import detect_format, open_source
from sfcache.store import open_cache
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.loop import CHECKPOINT, METRICS, TrainConfig, Trainer, TrainResult, run_identity
from sfcache.train.probe import PATCH_EMBEDDING, POLICY, ProbeConfig, depth_source, run_probe
from sfcache.vggt.weights import HUB_ID, RANDOM_SPEC, random_weights_warning, weights_config

__all__ = [
    "SUITES",
    "ReproduceConfig",
    "ReproduceReport",
    "SuiteData",
    "SuiteResult",
    "find_suites",
    "preflight",
    "reproduce",
]

SUITES = ("spatial", "object", "goal", "10")
RUNS = {"sf": "with SF", "baseline": "without SF"}  # run folder -> label
GET_DATA = (
    "get the RLDS release with `huggingface-cli download openvla/modified_libero_rlds --repo-type dataset "
    "--local-dir DIR` (folders libero_<suite>_no_noops/), or the HDF5 suites with LIBERO's "
    "benchmark_scripts/download_libero_datasets.py (folders libero_<suite>/), then pass --libero-dir DIR "
    "(LIBERO_DIR=DIR with make)"
)
GET_VGGT = (
    "get the official checkpoint facebook/VGGT-1B (CC BY-NC 4.0) with `huggingface-cli download "
    "facebook/VGGT-1B model.pt --local-dir DIR` and pass --vggt DIR/model.pt (VGGT=DIR/model.pt with make), or "
    "facebook/VGGT-1B once it is in your Hugging Face cache"
)
NO_GEOMETRY = (
    "RANDOM VGGT WEIGHTS ({spec}): the targets carry no geometry. This run tests the pipeline; "
    "it is NOT a reproduction of Spatial Forcing."
)


def _parse_suites(text: str) -> tuple[str, ...]:
    """'spatial, libero_object' -> ('spatial', 'object')."""
    return tuple(suite.removeprefix("libero_") for suite in comma_list(text) if suite)


@dataclass(frozen=True)
class ReproduceConfig:
    """Inputs of the reproduction; the defaults are for real runs on a GPU (each help is its option's).

    An option handed on to a stage takes its default, help and check from that stage's config (`option_like`).
    Making one checks nothing: `preflight` lists every problem (`problems()`, the data, weights, device and
    scheduler) in one message, so a user fixes them all in one go.
    """

    libero_dir: Path | None = option(
        None,
        "Folder holding libero_<suite>_no_noops/ (RLDS or HDF5) or libero_<suite>/ (HDF5) folders.",
        parse=user_path,
        show=str,
        required=True,
    )
    vggt: str | None = option(
        None,
        "VGGT checkpoint path, a cached hub id (facebook/VGGT-1B), or random:<preset> (pipeline tests only).",
        required=True,
    )
    out: Path = option(Path("out/reproduce-libero"), "Output folder (caches, runs, report).")
    device: str = option_like(ExtractConfig, "device")
    scheduler: str | None = option_like(ExtractConfig, "scheduler")
    suites: tuple[str, ...] = option(SUITES, "Comma list of suites to run.", parse=_parse_suites, show=comma_text)
    require_all: bool = option(False, "Stop if any asked suite is missing.")
    steps: int = option_like(TrainConfig, "steps")
    model_size: str = option_like(TrainConfig, "model_size")
    batch_size: int = option_like(TrainConfig, "batch_size")
    grid: int = option_like(
        TrainConfig, "grid", help="Target grid and policy tokens, NxN or N per side (16x16 -> 224 px images)."
    )
    dtype: str = option_like(ExtractConfig, "dtype")
    # the baseline runs are the alpha 0 ones: this alpha is the SF runs' only
    align_weight: float = option_like(TrainConfig, "align_weight", help="SF's alpha for the runs with SF.")
    # a report's validation L1 needs more held-out episodes than a quick `sf train`
    val_episodes: int = option_like(TrainConfig, "val_episodes", default=10, help="Held-out episodes per suite.")
    val_every: int = option_like(TrainConfig, "val_every", help="Validate and checkpoint every N steps.")
    loader_workers: int = option_like(TrainConfig, "loader_workers")
    extract_batch_size: int = option_like(ExtractConfig, "batch_size")
    steps_per_shard: int = option_like(ExtractConfig, "steps_per_shard")
    eval_trials: int = option_like(
        EvalConfig,
        "trials_per_task",
        help="LIBERO simulator episodes per task and checkpoint (OFT: 50); 0 skips the simulator evaluation.",
    )
    eval_checkpoints: int = option(
        1, "Checkpoints evaluated per run, evenly spaced, the last one included (>1 plots success vs steps)."
    )
    eval_max_steps: int | None = option_like(EvalConfig, "max_steps")
    probe_dir: Path | None = option(
        None,
        "Folder of LIBERO HDF5 suites with depth (libero_<suite>/ from `sf collect-libero --depth` or "
        "`sf render-depth`): probe both policies' tokens for depth (`sf probe`), side by side.",
        parse=user_path,
        show=str,
    )
    probe_steps: int = option_like(ProbeConfig, "steps", help="Training steps of each depth-probe head.")
    probe_every: int = option_like(ProbeConfig, "every")

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))

    def problems(self) -> list[str | Message]:
        """What is wrong with the options: this config's own checks, then those of each stage's config built
        from it (device and scheduler are `preflight`'s), each naming the option as `sf reproduce-libero` does."""
        named = partial(field_of, ReproduceConfig)
        problems = []
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            problems.append(Message(named("suites"), f" {','.join(self.suites)}: choose from {','.join(SUITES)}"))
        if self.align_weight <= 0:
            problems.append(
                Message(
                    named("align_weight"),
                    f" must be > 0 for the SF runs (the baseline uses 0), got {self.align_weight}",
                )
            )
        if self.eval_trials < 0 or self.eval_checkpoints < 1:
            problems.append(
                Message(
                    named("eval_trials"),
                    " must be >= 0 and ",
                    named("eval_checkpoints"),
                    f" >= 1, got {self.eval_trials} and {self.eval_checkpoints}",
                )
            )
        if self.val_episodes < 1:
            problems.append(
                Message(
                    named("val_episodes"),
                    f" must be >= 1 (validation L1 is the evaluation), got {self.val_episodes}",
                )
            )
        if self.out.is_file():
            problems.append(
                Message(named("out"), f" {self.out}: is a file; expected an output folder (new or to resume)")
            )
        if self.probe_dir is not None and not self.probe_dir.is_dir():
            problems.append(
                Message(named("probe_dir"), f" {self.probe_dir}: no such directory (LIBERO HDF5 suites with depth)")
            )
        # the stage configs check device and scheduler, and alpha and held-out episodes less strictly: those are
        # left out (valid values), so each problem is named once
        checked = replace(
            self, device="auto", scheduler=None, align_weight=1.0, val_episodes=1, out=self.out / "preflight"
        )
        suite = SuiteData(SUITES[0], Path("."), "libero_rlds")
        stages = [
            lambda: _extraction_config(checked, suite, checked.out),
            # save_every is set from --val-every too: checked as val_every alone, so it is named once
            lambda: TrainConfig(
                **_training_fields(checked, suite, checked.out, checked.out, checked.align_weight) | {"save_every": 1}
            ),
            lambda: _probe_config(checked, checked.out, checked.out),
        ]
        if self.eval_trials > 0:
            stages.append(lambda: _evaluation_config(checked, suite, checked.out))
        fields = handed_on(ReproduceConfig)
        for build in stages:
            try:
                build()
            except SfcacheError as problem:
                problems.append(problem.message.renamed(fields))
        return problems


@dataclass(frozen=True)
class SuiteData:
    """One LIBERO suite found on disk."""

    suite: str  # "spatial", "object", "goal", "10"
    path: Path  # the folder handed to open_source
    format: str  # libero_rlds | libero_hdf5

    @property
    def name(self) -> str:
        return f"libero_{self.suite}"


@dataclass(frozen=True)
class SuiteResult:
    """One suite's part of the report: its cache, both training runs and (when run) their simulator success."""

    path: str
    format: str
    cache: dict  # extract_suite's figures: steps, bytes, extraction timing, weights
    runs: dict  # {"sf" | "baseline": curves and final validation L1}
    evaluation: dict | None  # {"sf" | "baseline": success per evaluated checkpoint}; None without simulator
    plot: str
    plots: list[str]
    probe: dict | None = None  # {"sf" | "baseline": sf probe's held-out results}; None without --probe-dir


@dataclass(frozen=True)
class ReproduceReport:
    """What `reproduce` found (report.json is `asdict` of it)."""

    random_weights: bool
    is_reproduction: bool
    warnings: list[str]
    evaluation: str  # how the runs were evaluated
    suites_missing: list[str]
    config: dict  # ReproduceConfig as JSON
    suites: dict[str, SuiteResult]


# ----------------------------------------------------------------------------- checks before any work


def find_suites(libero_dir: Path, suites: tuple[str, ...]) -> tuple[list[SuiteData], list[str]]:
    """Suites found under `libero_dir` (the `_no_noops` folder, RLDS or HDF5, before the original HDF5 one)
    and the names of those not found."""
    found, missing = [], []
    for suite in suites:
        for folder in (libero_dir / f"libero_{suite}_no_noops", libero_dir / f"libero_{suite}"):
            if not folder.is_dir():
                continue
            try:
                fmt = detect_format(folder)
            except SourceError:
                continue
            if fmt in ("libero_rlds", "libero_hdf5"):
                found.append(SuiteData(suite, folder, fmt))
                break
        else:
            missing.append(f"libero_{suite}")
    return found, missing


def _check_data(cfg: ReproduceConfig) -> tuple[list[SuiteData], list[str], list[str]]:
    """(suites found, suites missing, problems)."""
    if cfg.libero_dir is None:
        return [], [], [f"--libero-dir is not given (LIBERO_DIR= with make): {GET_DATA}"]
    root = cfg.libero_dir
    if not root.is_dir():
        return [], [], [f"--libero-dir {root}: no such directory; {GET_DATA}"]
    found, missing = find_suites(root, cfg.suites)
    looked = ", ".join(f"libero_{s}_no_noops/ or libero_{s}/" for s in cfg.suites)
    if not found:
        hint = ""
        if root.name.startswith("libero_"):
            hint = f" ({root.name} looks like one suite folder: pass its parent {root.parent} instead)"
        return (
            [],
            missing,
            [f"--libero-dir {root} holds none of the LIBERO suites{hint}; looked for {looked}. {GET_DATA}"],
        )
    if missing and cfg.require_all:
        return (
            found,
            missing,
            [
                f"--libero-dir {root}: found {', '.join(s.name for s in found)} but not "
                f"{', '.join(missing)} (--require-all); {GET_DATA}"
            ],
        )
    return found, missing, []


def _check_vggt(spec: str | None) -> list[str]:
    """Problems with the VGGT spec, found without loading or downloading the model."""
    if not spec:
        return [f"--vggt is not given (VGGT= with make): {GET_VGGT}"]
    if RANDOM_SPEC.match(spec):
        try:
            weights_config(spec)
        except WeightsError as error:
            return [str(error)]
        return []
    if Path(spec).expanduser().exists():
        try:
            weights_config(spec)
        except WeightsError as error:
            return [f"--vggt {spec}: {error}; {GET_VGGT}"]
        return []
    if HUB_ID.match(spec):
        return _check_hub_cache(spec)
    return [f"--vggt {spec}: no such file or directory, and not a hub id; {GET_VGGT}"]


def _check_hub_cache(repo_id: str) -> list[str]:
    """A hub id is used only from the local Hugging Face cache: nothing is downloaded behind the user's back."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return [f"--vggt {repo_id}: a hub id needs huggingface_hub (pip install 'sfcache[hub]'); or {GET_VGGT}"]
    for name in ("model.safetensors", "model.pt"):
        if isinstance(try_to_load_from_cache(repo_id, name), str):
            return []
    return [f"--vggt {repo_id}: not in the local Hugging Face cache, and this command downloads nothing; {GET_VGGT}"]


def _check_device(device: str) -> list[Message]:
    named = field_of(ReproduceConfig, "device")
    try:
        check_device(device, named)
    except SfcacheError:
        return [Message(named, f" {device}: expected {DEVICE_CHOICES}")]
    try:
        resolve_device(device, name=named)
    except SfcacheError as problem:
        return [Message(problem.message, " (", named, " auto picks a GPU when there is one)")]
    return []


def _check_scheduler(address: str | None) -> list[str]:
    if not address:
        return []
    from distributed import Client

    try:
        with Client(address, timeout="10s"):
            return []
    except (OSError, ValueError) as error:
        return [f"--scheduler {address}: cannot reach the Dask scheduler ({error}); leave it out for a local cluster"]


def probe_data(probe_dir: Path, suite: SuiteData) -> Path:
    """The suite's LIBERO HDF5 dataset with depth under --probe-dir, checked as `sf probe` checks it."""
    found, _ = find_suites(probe_dir, (suite.suite,))
    if not found or found[0].format != "libero_hdf5":
        raise SfcacheError(f"--probe-dir {probe_dir}: no LIBERO HDF5 {suite.name}/ (with depth) to probe")
    depth_source(found[0].path)
    return found[0].path


def _check_probe_data(cfg: ReproduceConfig, found: list[SuiteData]) -> list[str]:
    """A problem per suite to run whose depth data --probe-dir lacks (none without --probe-dir)."""
    if cfg.probe_dir is None or not cfg.probe_dir.is_dir():  # no probe, or the option's own problem
        return []
    problems = []
    for suite in found:
        try:
            probe_data(cfg.probe_dir, suite)
        except SfcacheError as problem:
            problems.append(str(problem))
    return problems


def preflight(cfg: ReproduceConfig) -> tuple[list[SuiteData], list[str]]:
    """(suites to run, suites missing); SfcacheError listing every problem with the inputs, before any work."""
    found, missing, data_problems = _check_data(cfg)
    problems = (
        cfg.problems()
        + data_problems
        + _check_probe_data(cfg, found)
        + _check_vggt(cfg.vggt)
        + _check_device(cfg.device)
        + _check_scheduler(cfg.scheduler)
    )
    if problems:
        raise SfcacheError(Message("nothing was run:\n  - ", Message.join("\n  - ", problems)))
    return found, missing


# ----------------------------------------------------------------------------- stages


def _store_complete(store: Path, cfg: ReproduceConfig, suite: SuiteData) -> bool:
    """True when `store` holds every step, extracted from this data with these weights and grid."""
    try:
        cache = open_cache(store)
        done = cache.done_shards().all()
    except StoreError:
        return False
    made = cache.provenance
    stored = {"weights": made.vggt.weights, "grid": tuple(made.targets.grid), "dtype": made.targets.dtype}
    asked = {"weights": cfg.vggt, "grid": (cfg.grid, cfg.grid), "dtype": cfg.dtype}
    same_data = not dataset_differences(made.source, open_source(suite.path, suite.format).describe())
    return bool(done) and same_data and not differences(stored, asked, ("weights", "grid", "dtype"))


def extract_suite(cfg: ReproduceConfig, suite: SuiteData, folder: Path, console: Console) -> dict:
    """Extract (or finish) the suite's cache; the timing of each run that extracted steps is kept in extract.json."""
    store, log = folder / "cache", folder / "extract.json"
    runs = json.loads(log.read_text())["runs"] if log.exists() else []
    if _store_complete(store, cfg, suite):
        console.print(f"  extract: {store} is complete, skipped")
    else:
        try:
            summary = extract(_extraction_config(cfg, suite, store))
        except ConfigMismatch as mismatch:  # sf reproduce-libero has no --overwrite
            raise mismatch.with_fix(f"use another --out, or delete {store} to extract it again") from None
        runs.append(
            {
                k: getattr(summary, k)
                for k in (
                    "extracted_steps",
                    "already_done_steps",
                    "extract_s",
                    "steps_per_s",
                    "cluster_startup_s",
                    "workers",
                    "device",
                )
            }
        )
        log.write_text(json.dumps({"runs": runs}, indent=1))
        console.print(
            f"  extract: {summary.extracted_steps} steps in {summary.extract_s:.1f} s "
            f"({summary.steps_per_s:.2f} steps/s on {summary.workers} worker(s), {summary.device}); "
            f"{summary.already_done_steps} were already done"
        )
    facts = summarize(open_cache(store))
    extracted = sum(r["extracted_steps"] for r in runs)
    seconds = sum(r["extract_s"] for r in runs)
    return {
        "store": str(store),
        "episodes": facts.episodes,
        "steps": facts.steps,
        "bytes_on_disk": facts.bytes_on_disk,
        "bytes_per_step": facts.bytes_per_step,
        "raw_bytes_per_step": facts.raw_bytes_per_step,
        "weights_id": facts.vggt.weights_id,
        "random_weights": facts.vggt.random_weights,
        "extract_steps_per_s": round(extracted / seconds, 3) if seconds else None,
        "extract_runs": runs,
    }


def _extraction_config(cfg: ReproduceConfig, suite: SuiteData, store: Path) -> ExtractConfig:
    return ExtractConfig(
        source=suite.path,
        out=store,
        vggt=cfg.vggt,
        format=suite.format,
        layers=(-1,),  # SF: last
        grid=(cfg.grid, cfg.grid),
        dtype=cfg.dtype,
        batch_size=cfg.extract_batch_size,
        steps_per_shard=cfg.steps_per_shard,
        scheduler=cfg.scheduler,
        device=cfg.device,
    )


def _training_config(
    cfg: ReproduceConfig, suite: SuiteData, store: Path, out: Path, align_weight: float
) -> TrainConfig:
    return TrainConfig(**_training_fields(cfg, suite, store, out, align_weight))


def _training_fields(cfg: ReproduceConfig, suite: SuiteData, store: Path, out: Path, align_weight: float) -> dict:
    """The `TrainConfig` fields of one run of a suite."""
    return dict(
        source=suite.path,
        out=out,
        cache=store if align_weight > 0 else None,
        align_weight=align_weight,
        **same_fields(cfg, ("steps", "batch_size", "model_size", "grid", "device", "val_episodes")),
        val_every=cfg.val_every,
        save_every=cfg.val_every,
        loader_workers=cfg.loader_workers,
    )


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


RUN_SETTINGS = ("step", *identity_fields(TrainConfig), "steps")  # what a finished run must match


def _training_finished(config: TrainConfig) -> bool:
    """True when the checkpoint is at the last step with this run's settings and its final validation is logged."""
    checkpoint = config.out / CHECKPOINT
    if not checkpoint.exists():
        return False
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    asked = {"step": config.steps, **run_identity(config), "steps": config.steps}
    final_val = any(r["split"] == "val" and r["step"] == config.steps for r in _read_metrics(config.out / METRICS))
    return not differences({"step": saved["step"], **saved["config"]}, asked, RUN_SETTINGS) and final_val


SNAPSHOTS = "snapshots"


class SnapshotTrainer(Trainer):
    """The trainer, also keeping the weights of every checkpoint (RUN/snapshots/step_N.pt, no optimizer state)
    so that several training steps can be evaluated in the simulator."""

    def save(self) -> None:
        super().save()
        folder = self.config.out / SNAPSHOTS
        folder.mkdir(exist_ok=True)
        state = self._state()
        snapshot = folder / f"step_{self.step:06d}.pt"
        partial = snapshot.with_suffix(".pt.partial")  # a kill mid-write leaves no torn snapshot to evaluate
        torch.save({k: state[k] for k in ("step", "model", "policy", "identity", "config")}, partial)
        os.replace(partial, snapshot)


def train_keeping_snapshots(config: TrainConfig, snapshots: bool = False) -> TrainResult:
    """`sfcache.train.loop.train`, keeping a weights snapshot at every checkpoint when asked."""
    return (SnapshotTrainer if snapshots else Trainer)(config).run()


def train_suite(cfg: ReproduceConfig, suite: SuiteData, folder: Path, console: Console) -> dict:
    """Train with and without SF (each resumes from its checkpoint); returns both runs' curves and final L1."""
    runs = {}
    for run, align_weight in (("sf", cfg.align_weight), ("baseline", 0.0)):
        config = _training_config(cfg, suite, folder / "cache", folder / run, align_weight)
        if _training_finished(config):
            console.print(f"  train {RUNS[run]}: {config.out} finished {cfg.steps} steps, skipped")
        else:
            summary = train_keeping_snapshots(config, snapshots=cfg.eval_checkpoints > 1)
            resumed = f" (resumed from step {summary.resumed_from})" if summary.resumed_from is not None else ""
            console.print(f"  train {RUNS[run]} (alpha {align_weight}): {summary.steps} steps{resumed}")
        records = _read_metrics(config.out / METRICS)
        val = [r for r in records if r["split"] == "val"]
        runs[run] = {
            "out": str(config.out),
            "align_weight": align_weight,
            "val_action_l1": val[-1]["val_action_l1"],
            "val_mean_action_l1": val[-1]["val_mean_action_l1"],
            "train": [
                {k: r[k] for k in ("step", "action_l1", "align_loss") if k in r}
                for r in records
                if r["split"] == "train"
            ],
            "val": [{"step": r["step"], "val_action_l1": r["val_action_l1"]} for r in val],
        }
        console.print(
            f"    validation action L1 {runs[run]['val_action_l1']:.4f} "
            f"(mean-action baseline {runs[run]['val_mean_action_l1']:.4f})"
        )
    return runs


def _evaluation_config(cfg: ReproduceConfig, suite: SuiteData, out: Path, resolution: int = RESOLUTION) -> EvalConfig:
    """`resolution`: the render size, the checkpoint's training frame size when known (`render_size`)."""
    return EvalConfig(
        suite=suite.suite,
        out=out,
        trials_per_task=cfg.eval_trials,
        max_steps=cfg.eval_max_steps,
        resolution=resolution,
    )


def _checkpoints_to_evaluate(run: Path, count: int) -> list[Path]:
    """The final checkpoint and up to count - 1 evenly spaced earlier snapshots, in step order."""
    snapshots = sorted((run / SNAPSHOTS).glob("step_*.pt"))[:-1] if count > 1 else []
    if snapshots:
        chosen = np.unique(np.linspace(0, len(snapshots) - 1, min(count - 1, len(snapshots))).round().astype(int))
        snapshots = [snapshots[i] for i in chosen]
    return [*snapshots, run / CHECKPOINT]


def evaluate_suite(cfg: ReproduceConfig, suite: SuiteData, folder: Path, console: Console) -> dict | None:
    """Simulator success rates of the SF and baseline runs (each resumes from its results.jsonl), or None."""
    if cfg.eval_trials == 0 or simulator_available() is not None:
        return None
    runs = {}
    for run in RUNS:
        points = []
        for checkpoint in _checkpoints_to_evaluate(folder / run, cfg.eval_checkpoints):
            policy = CheckpointPolicy(checkpoint, device=cfg.device)
            out = folder / run / "eval_libero" / f"step_{policy.step:06d}"
            config = _evaluation_config(cfg, suite, out, policy.render_size(RESOLUTION))
            summary = evaluate(policy, config, policy.describe())
            points.append(
                {
                    "step": policy.step,
                    "success_rate": summary.success_rate,
                    "ci95": summary.ci95,
                    "episodes": summary.episodes,
                    "protocol": summary.protocol,
                    "summary": str(out / "summary.json"),
                }
            )
            console.print(
                f"  simulator {RUNS[run]}, step {policy.step}: success {100 * summary.success_rate:.1f}% "
                f"(95% {100 * summary.ci95[0]:.1f}-{100 * summary.ci95[1]:.1f}%) over "
                f"{summary.episodes} episodes"
            )
        runs[run] = points
    return runs


def _probe_config(cfg: ReproduceConfig, run: Path, data: Path) -> ProbeConfig:
    """`sf probe` of one run's checkpoint on the suite's depth data, into RUN/probe."""
    return ProbeConfig(
        checkpoint=run, data=data, out=run / "probe", steps=cfg.probe_steps, every=cfg.probe_every, device=cfg.device
    )


def probe_suite(cfg: ReproduceConfig, suite: SuiteData, folder: Path, console: Console) -> dict | None:
    """`sf probe` of the SF and the baseline run (each resumes) on the suite's depth dataset, or None."""
    if cfg.probe_dir is None:
        return None
    data = probe_data(cfg.probe_dir, suite)  # checked by preflight
    runs = {}
    for run in RUNS:
        out = folder / run / "probe"
        report = run_probe(_probe_config(cfg, folder / run, data))
        runs[run] = {"report": str(out / "probe.json"), "layers": report["about"]["layers"]}
        runs[run].update(data=str(data), test=report["results"]["test"])
        policy = report["results"]["test"][POLICY]
        console.print(
            f"  depth probe {RUNS[run]}: AbsRel "
            + ", ".join(f"{view} {figure(metrics['abs_rel'])}" for view, metrics in policy.items())
        )
    return runs


def _probe_lines(results: dict[str, SuiteResult], random_weights: bool) -> list[str]:
    """report.md's depth-probe table: AbsRel per view of both policies' layers, their patch embeddings, the mean."""
    probed = {name: r.probe for name, r in results.items() if r.probe}
    if not probed:
        return []
    lines = [
        "## Depth probe (`sf probe`, held-out episodes, AbsRel: lower is better)",
        "",
        "| suite | view | policy with SF | policy without SF | patch embedding with SF | "
        "patch embedding without SF | mean depth image |",
        "|" + "---|" * 7,
    ]
    for name, probe in probed.items():
        sf, base = probe["sf"]["test"], probe["baseline"]["test"]
        for view in sf[POLICY]:
            cells = [sf[POLICY], base[POLICY], sf[PATCH_EMBEDDING], base[PATCH_EMBEDDING], sf[MEAN_DEPTH]]
            lines.append(f"| {name} | {view} | " + " | ".join(figure(c[view]["abs_rel"]) for c in cells) + " |")
    lines += ["", "Read each policy's layers against its own patch embedding and the mean-depth image (README)."]
    if random_weights:
        lines.append("The SF policy aligned to RANDOM VGGT weights: its tokens carry no geometry from SF.")
    return [*lines, ""]


def plot_success(name: str, evaluation: dict, png: Path, warning: str | None = None) -> None:
    """Simulator success rate (with its 95% interval) against training steps, with vs without SF; `warning` (the
    random-weights one) across the top in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run, label in RUNS.items():
        points = evaluation[run]
        steps = [p["step"] for p in points]
        ax.plot(steps, [100 * p["success_rate"] for p in points], "o-", label=label)
        ax.fill_between(steps, [100 * p["ci95"][0] for p in points], [100 * p["ci95"][1] for p in points], alpha=0.2)
    ax.set(title=f"{name}: LIBERO simulator success", xlabel="training step", ylabel="success (%)", ylim=(0, 100))
    ax.legend()
    _warn_in_figure(fig, warning)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def plot_suite(name: str, runs: dict, png: Path, warning: str | None = None) -> None:
    """Train and validation action L1 with vs without SF, one figure per suite (a single logged point drawn as a
    marker); `warning` (the random-weights one) across the top in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run, label in RUNS.items():
        curve = runs[run]
        train = curve["train"]
        marker = "o" if len(train) == 1 else None
        left.plot([r["step"] for r in train], [r["action_l1"] for r in train], marker=marker, label=label)
        right.plot([r["step"] for r in curve["val"]], [r["val_action_l1"] for r in curve["val"]], "o-", label=label)
    left.set(title=f"{name}: train action L1", xlabel="step", ylabel="action L1 (training batches)")
    right.set(title=f"{name}: validation action L1", xlabel="step", ylabel="action L1 (held-out episodes)")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps, never 1.975
        ax.legend()
    _warn_in_figure(fig, warning)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _warn_in_figure(fig, warning: str | None) -> None:
    """The random-weights warning as the figure's red title, wrapped to its width (nothing for real weights)."""
    if warning:
        fig.suptitle(textwrap.fill(warning, int(fig.get_figwidth() * 11)), color="red", fontweight="bold", fontsize=9)


def simulator_note(cfg: ReproduceConfig) -> str:
    """How the runs are evaluated: in the simulator when it is installed and asked for, else offline only."""
    offline = "evaluated offline (validation action L1 on held-out episodes)"
    if cfg.eval_trials == 0:
        return f"simulator evaluation off (--eval-trials 0): {offline}"
    missing = simulator_available()
    if missing is not None:
        return f"{missing}: {offline} only"
    steps = (
        f"{cfg.eval_max_steps} steps per episode (shortened)" if cfg.eval_max_steps else "the protocol's step limits"
    )
    return (
        f"closed-loop success in the LIBERO simulator (OpenVLA-OFT protocol: {cfg.eval_trials} trials per task, "
        f"{steps}) and validation action L1 on held-out episodes"
    )


def _success(evaluation: dict | None, run: str) -> str:
    if not evaluation:
        return "n/a"
    last = evaluation[run][-1]
    return f"{100 * last['success_rate']:.1f}% ({100 * last['ci95'][0]:.0f}-{100 * last['ci95'][1]:.0f})"


def write_report(
    cfg: ReproduceConfig, results: dict[str, SuiteResult], missing: list[str], out: Path
) -> ReproduceReport:
    """report.json (every number) and report.md (tables, warnings, plots); returns the report."""
    random_weights = any(r.cache["random_weights"] for r in results.values())
    report = ReproduceReport(
        random_weights=random_weights,
        is_reproduction=not random_weights,
        warnings=[NO_GEOMETRY.format(spec=cfg.vggt)] if random_weights else [],
        evaluation=simulator_note(cfg),
        suites_missing=missing,
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        suites=results,
    )
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1))
    lines = ["# Spatial Forcing with sfcache: LIBERO", ""]
    if random_weights:
        lines += [f"> **WARNING: {report.warnings[0]}**", ""]
    lines += [
        f"VGGT `{cfg.vggt}` (last layer, {cfg.grid}x{cfg.grid} grid, {cfg.dtype}); policy `{cfg.model_size}`, "
        f"{cfg.steps} steps, batch {cfg.batch_size}, alpha {cfg.align_weight} vs 0, "
        f"{cfg.val_episodes} held-out episodes per suite.",
        "",
        f"Evaluation: {report.evaluation}.",
        "",
    ]
    if missing:
        lines += [f"Suites not found in {cfg.libero_dir}: {', '.join(missing)}.", ""]
    lines += [
        "| suite | data | episodes | steps | cache bytes | bytes/step | extraction steps/s "
        "| val L1 with SF | val L1 without SF | mean-action L1 | success with SF | success without SF |",
        "|" + "---|" * 12,
    ]
    for name, r in results.items():
        c, runs = r.cache, r.runs
        rate = f"{c['extract_steps_per_s']:.2f}" if c["extract_steps_per_s"] else "n/a (not timed here)"
        lines.append(
            f"| {name} | {r.format} | {c['episodes']} | {c['steps']} | {c['bytes_on_disk']} | "
            f"{c['bytes_per_step']:.0f} | {rate} | {runs['sf']['val_action_l1']:.4f} | "
            f"{runs['baseline']['val_action_l1']:.4f} | {runs['sf']['val_mean_action_l1']:.4f} | "
            f"{_success(r.evaluation, 'sf')} | {_success(r.evaluation, 'baseline')} |"
        )
    lines += ["", "Success: the last checkpoint's rate in the simulator, with its 95% Wilson interval.", ""]
    lines += _probe_lines(results, random_weights)
    for name, r in results.items():
        lines += [f"## {name}", ""] + [f"![{name}]({Path(p).relative_to(out).as_posix()})" for p in r.plots] + [""]
    (out / "report.md").write_text("\n".join(lines))
    return report


# ----------------------------------------------------------------------------- driver


def reproduce(cfg: ReproduceConfig, console: Console | None = None) -> ReproduceReport:
    """Check inputs, then extract, train (with and without SF) and report every suite found (report.json)."""
    console = console or Console(soft_wrap=True)
    suites, missing = preflight(cfg)
    random_weights = bool(RANDOM_SPEC.match(cfg.vggt))
    if random_weights:
        console.print(f"[bold red]{NO_GEOMETRY.format(spec=cfg.vggt)}[/]", highlight=False)
    console.print(f"suites found: {', '.join(f'{s.name} ({s.format}, {s.path})' for s in suites)}", highlight=False)
    if missing:
        console.print(f"[yellow]suites not found, left out:[/] {', '.join(missing)} (--require-all to stop instead)")
    console.print(simulator_note(cfg))
    cfg.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for suite in suites:
        console.rule(f"[bold]{suite.name}")
        folder = cfg.out / suite.name
        folder.mkdir(exist_ok=True)
        cache = extract_suite(cfg, suite, folder, console)
        runs = train_suite(cfg, suite, folder, console)
        evaluation = evaluate_suite(cfg, suite, folder, console)
        probe = probe_suite(cfg, suite, folder, console)
        plots = [cfg.out / "plots" / f"{suite.name}.png"]
        plots[0].parent.mkdir(exist_ok=True)
        warning = random_weights_warning(cache["weights_id"])
        plot_suite(suite.name, runs, plots[0], warning)
        if evaluation and len(evaluation["sf"]) > 1:
            plots.append(cfg.out / "plots" / f"{suite.name}_success.png")
            plot_success(suite.name, evaluation, plots[1], warning)
        results[suite.name] = SuiteResult(
            path=str(suite.path),
            format=suite.format,
            cache=cache,
            runs=runs,
            evaluation=evaluation,
            plot=str(plots[0]),
            plots=[str(p) for p in plots],
            probe=probe,
        )
    report = write_report(cfg, results, missing, cfg.out)
    _print_summary(console, results)
    if random_weights:
        console.print(f"[bold red]{NO_GEOMETRY.format(spec=cfg.vggt)}[/]", highlight=False)
    console.print(
        f"report: {cfg.out / 'report.md'}\nnumbers: {cfg.out / 'report.json'}\nplots: {cfg.out / 'plots'}",
        highlight=False,
    )
    return report


def _print_summary(console: Console, results: dict[str, SuiteResult]) -> None:
    table = Table(
        "suite",
        "steps",
        "cache MiB",
        "steps/s",
        "val L1 SF",
        "val L1 baseline",
        "success SF",
        "success baseline",
        title="LIBERO",
    )
    for name, r in results.items():
        c, runs = r.cache, r.runs
        table.add_row(
            name,
            str(c["steps"]),
            f"{c['bytes_on_disk'] / 2**20:.1f}",
            f"{c['extract_steps_per_s']:.2f}" if c["extract_steps_per_s"] else "n/a",
            f"{runs['sf']['val_action_l1']:.4f}",
            f"{runs['baseline']['val_action_l1']:.4f}",
            _success(r.evaluation, "sf"),
            _success(r.evaluation, "baseline"),
        )
    console.print(table)
