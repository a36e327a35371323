"""`make reproduce-libero`: the whole Spatial Forcing pipeline over the four LIBERO suites, with a report.

Per suite: extract a target cache once, train the policy with SF (alpha 0.5) and the baseline without
(alpha 0), read validation action L1 on held-out episodes, evaluate both in the LIBERO simulator when it
is installed (`sf eval-libero`'s loop, OpenVLA-OFT's protocol), probe both policies' tokens for depth when
`--probe-dir` holds the suite with depth (`sf probe`), then write report.md / report.json and
plots per suite. Every input is checked before any work starts. Every stage resumes: the extractor
fills in unfinished shards, the trainer continues from its checkpoint, and a stage counts as done
only when its outputs say so (a complete store, a checkpoint at the last step), never by a marker.
Run it as `sf reproduce-libero` (sfcache/cli/reproduce.py) or `make reproduce-libero`. Its options and the
checks before any work are in reproduce_config.py, the report in reproduce_report.py; this module runs the stages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from sfcache.errors import ConfigMismatch, StoreError, differences
from sfcache.extract import extract
from sfcache.inspection import summarize
from sfcache.libero_eval import evaluate
from sfcache.libero_sim import RESOLUTION, simulator_available
from sfcache.probe.metrics import figure
from sfcache.provenance import dataset_differences, identity_fields
from sfcache.sources import open_source
from sfcache.store import open_cache
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.loop import CHECKPOINT, METRICS, TrainConfig, Trainer, TrainResult, run_identity
from sfcache.train.probe import POLICY, run_probe
from sfcache.train.reproduce_config import (
    SUITES,
    ReproduceConfig,
    SuiteData,
    evaluation_config,
    extraction_config,
    preflight,
    probe_config,
    probe_data,
    training_config,
)
from sfcache.train.reproduce_report import (
    NO_GEOMETRY,
    RUNS,
    ReproduceReport,
    SuiteResult,
    plot_success,
    plot_suite,
    print_summary,
    write_report,
)
from sfcache.vggt.weights import RANDOM_SPEC, random_weights_warning

__all__ = [
    "SUITES",
    "ReproduceConfig",
    "ReproduceReport",
    "SuiteData",
    "SuiteResult",
    "preflight",
    "reproduce",
]


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
            summary = extract(extraction_config(cfg, suite, store))
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
        config = training_config(cfg, suite, folder / "cache", folder / run, align_weight)
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
            config = evaluation_config(cfg, suite, out, policy.render_size(RESOLUTION))
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


def probe_suite(cfg: ReproduceConfig, suite: SuiteData, folder: Path, console: Console) -> dict | None:
    """`sf probe` of the SF and the baseline run (each resumes) on the suite's depth dataset, or None."""
    if cfg.probe_dir is None:
        return None
    data = probe_data(cfg.probe_dir, suite)  # checked by preflight
    runs = {}
    for run in RUNS:
        out = folder / run / "probe"
        report = run_probe(probe_config(cfg, folder / run, data))
        runs[run] = {"report": str(out / "probe.json"), "layers": report["about"]["layers"]}
        runs[run].update(data=str(data), test=report["results"]["test"])
        policy = report["results"]["test"][POLICY]
        console.print(
            f"  depth probe {RUNS[run]}: AbsRel "
            + ", ".join(f"{view} {figure(metrics['abs_rel'])}" for view, metrics in policy.items())
        )
    return runs


# ----------------------------------------------------------------------------- driver


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
    note = simulator_note(cfg)
    console.print(note)
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
    report = write_report(cfg, results, missing, cfg.out, note)
    print_summary(console, results)
    if random_weights:
        console.print(f"[bold red]{NO_GEOMETRY.format(spec=cfg.vggt)}[/]", highlight=False)
    console.print(
        f"report: {cfg.out / 'report.md'}\nnumbers: {cfg.out / 'report.json'}\nplots: {cfg.out / 'plots'}",
        highlight=False,
    )
    return report
