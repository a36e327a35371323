"""`sf reproduce-libero`'s report: report.json (every number), report.md (tables, warnings, plots), the plots
and the summary table it prints."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sfcache.probe import MEAN_DEPTH
from sfcache.probe.metrics import figure
from sfcache.train.probe import PATCH_EMBEDDING, POLICY
from sfcache.train.reproduce_config import ReproduceConfig

RUNS = {"sf": "with SF", "baseline": "without SF"}  # run folder -> label
NO_GEOMETRY = (
    "RANDOM VGGT WEIGHTS ({spec}): the targets carry no geometry. This run tests the pipeline; "
    "it is NOT a reproduction of Spatial Forcing."
)


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


def _success(evaluation: dict | None, run: str) -> str:
    if not evaluation:
        return "n/a"
    last = evaluation[run][-1]
    return f"{100 * last['success_rate']:.1f}% ({100 * last['ci95'][0]:.0f}-{100 * last['ci95'][1]:.0f})"


def write_report(
    cfg: ReproduceConfig, results: dict[str, SuiteResult], missing: list[str], out: Path, evaluation: str
) -> ReproduceReport:
    """report.json (every number) and report.md (tables, warnings, plots); returns the report. `evaluation`: how
    the runs were evaluated (`simulator_note`)."""
    random_weights = any(r.cache["random_weights"] for r in results.values())
    report = ReproduceReport(
        random_weights=random_weights,
        is_reproduction=not random_weights,
        warnings=[NO_GEOMETRY.format(spec=cfg.vggt)] if random_weights else [],
        evaluation=evaluation,
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


def print_summary(console: Console, results: dict[str, SuiteResult]) -> None:
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
