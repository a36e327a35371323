"""`sf inspect-cache STORE`: what a target store holds, whether it is whole and right, what it looks like."""

from __future__ import annotations

import json
from contextlib import nullcontext

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from sfcache import inspection
from sfcache.cli.options import path_text
from sfcache.device import DEVICE_CHOICES, resolve_device
from sfcache.errors import NotAStore, SfcacheError
from sfcache.extract import ExtractConfig
from sfcache.options import default_of
from sfcache.progress import progress_bar

MISSING_SHOWN = 10  # episode keys listed before "... and N more"


def inspect_cache(
    store: str = typer.Argument(..., help="Store directory written by `sf extract --out`.", metavar="STORE"),
    episode: str | None = typer.Option(
        None,
        "--episode",
        help="Show one episode: instruction, steps, per-step token L2 norms per view. Also picks the --pca steps.",
    ),
    check: bool = typer.Option(
        False,
        "--check",
        help="Read every shard: decodable, finite, index and done "
        "markers consistent, provenance complete. Exit 1 listing each failure.",
    ),
    verify: int = typer.Option(
        0,
        "--verify",
        metavar="N",
        help="Recompute N random extracted steps from the "
        "source with the recorded configuration; per-token cosine vs stored.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed choosing the --verify steps."),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Worst cosine --verify accepts "
        "(default 0.999 for float16/bfloat16, 0.995 for int8; a --reduce store: its recorded "
        "held-out worst less 0.05, and a mean at most 0.01 below the recorded one).",
    ),
    vggt: str | None = typer.Option(
        None, "--vggt", help="Checkpoint for --verify when the recorded one moved; its sha256 must match the store's."
    ),
    device: str = typer.Option(
        default_of(ExtractConfig, "device"), "--device", help=f"Device for --verify: {DEVICE_CHOICES}."
    ),
    source: str | None = typer.Option(None, "--source", help="Dataset location for --verify/--pca when it moved."),
    pca: str | None = typer.Option(
        None,
        "--pca",
        help="Write a PNG: per step, each view's input to VGGT beside a PCA-to-RGB picture of its targets, under a "
        "band of labels and a caption; 2*views*W x (band + steps*H) pixels, W x H the frame (224x224 for openpi).",
    ),
    pca_steps: int = typer.Option(4, "--pca-steps", help="Steps drawn by --pca (one row each)."),
    layer: int | None = typer.Option(None, "--layer", help="Layer for --episode/--pca (default: the last stored)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout instead."),
) -> None:
    """Summarise a target store; optionally check, verify and picture it. Exit 1 if --check or --verify fails."""
    store, source, pca = path_text(store, "STORE"), path_text(source, "--source"), path_text(pca, "--pca")
    if threshold is not None and not 0 < threshold <= 1:
        raise SfcacheError(f"--threshold must be a cosine in (0, 1], got {threshold}")
    if pca is not None and pca.is_dir():
        raise SfcacheError(f"--pca {pca}: is a directory; give the path of the PNG file to write")
    report: dict = {}  # section name -> an inspection result record
    if check:
        with _bar(as_json, "shards") as bar:
            report["check"] = inspection.check(store, progress=bar)
    try:
        cache = inspection.open_store(store)
    except NotAStore:  # nothing to check or repair: one line (the check said so already when asked)
        raise
    except SfcacheError:
        if not check:
            raise
        _emit(report, as_json)  # the check already says what is wrong with the store
        raise typer.Exit(1) from None
    if layer is not None:
        cache.resolve_layer(layer, "--layer")  # refused as this command names it
    report["summary"] = inspection.summarize(cache)
    if episode is not None:
        report["episode"] = inspection.episode_report(cache, episode, layer)
    if verify:
        with _bar(as_json, "steps") as bar:
            report["verify"] = inspection.verify(
                cache,
                verify,
                seed=seed,
                weights=vggt,
                device=resolve_device(device, name="--device"),
                threshold=threshold,
                source_path=source,
                progress=bar,
            )
    if pca is not None:
        try:
            report["pca"] = inspection.pca_picture(
                cache, pca, steps=pca_steps, episode=episode, layer=layer, source_path=source
            )
        except OSError as error:
            raise SfcacheError(
                f"--pca {pca}: cannot write the picture ({error.strerror or error}); choose a writable file path"
            ) from None
    _emit(report, as_json)
    if not all(report[part].ok for part in ("check", "verify") if part in report):
        raise typer.Exit(1)


def _bar(quiet: bool, unit: str):
    """The standard progress bar, except under --json where stdout must stay pure JSON."""
    return nullcontext() if quiet else progress_bar(unit, transient=True)


def _emit(report: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({part: result.to_json() for part, result in report.items()}, indent=2))
        return
    console = Console()
    if "summary" in report:
        _render_summary(console, report["summary"])
    if "episode" in report:
        _render_episode(console, report["episode"])
    if "check" in report:
        _render_check(console, report["check"])
    if "verify" in report:
        _render_verify(console, report["verify"])
    if "pca" in report:
        picture = report["pca"]
        console.print(
            f"[bold]pca:[/] wrote {picture.path} ({picture.width}x{picture.height} px: "
            f"{len(picture.steps)} steps x \\[frame | PCA] per view, layer {picture.layer})"
        )


def _render_summary(console: Console, summary: inspection.Summary) -> None:
    for warning in summary.warnings:
        console.print(Panel(f"[bold]{warning}[/]", title="WARNING", border_style="bold red", style="red"))
    source, vggt = summary.source, summary.vggt
    table = Table(title=f"sfcache store {summary.store}", box=box.SIMPLE, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("source", f"{source['format']} at {source['path']}"),
        ("episodes / steps", f"{summary.episodes} / {summary.steps}"),
        ("views (VGGT order)", ", ".join(summary.views)),
        ("recipe", _recipe(summary.recipe)),
        ("layers", ", ".join(map(str, summary.layers))),
        ("grid x channels", f"{summary.grid[0]}x{summary.grid[1]} tokens per view x {summary.channels}"),
        ("dtype / codec", f"{summary.dtype} / {summary.codec} (checksum {summary.checksum})"),
        *([("reduce", _reduce(summary.reduce))] if summary.reduce else []),
        ("on disk", _bytes(summary.bytes_on_disk)),
        (
            "per step",
            f"{_bytes(summary.bytes_per_step)} on disk, {_bytes(summary.raw_bytes_per_step)} raw"
            if summary.bytes_per_step is not None
            else f"{_bytes(summary.raw_bytes_per_step)} raw",
        ),
        ("compression", _compression(summary)),
        (
            "complete",
            f"{'[green]yes[/]' if summary.complete else '[red]NO[/]'}: "
            f"{summary.shards_done}/{summary.shards} shards, "
            f"{summary.steps_done}/{summary.steps} steps",
        ),
        ("weights", vggt.weights),
        ("weights id", f"[bold red]{vggt.weights_id}[/]" if vggt.random_weights else vggt.weights_id),
        ("preprocess / compute", f"{vggt.preprocess} / {vggt.compute_dtype}"),
        ("created", summary.created),
        ("sfcache version", summary.sfcache_version),
    ]
    missing = summary.missing_episodes
    if missing:
        more = f" ... and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        rows.append(("missing episodes", "[red]" + "\n".join(missing[:MISSING_SHOWN]) + more + "[/]"))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def _reduce(reduce: inspection.ReduceSummary) -> str:
    floor = f", --min-cosine {reduce.min_cosine}" if reduce.min_cosine is not None else ""
    lines = [
        f"{reduce.asked}{floor}; basis fitted on {reduce.sample_steps} steps, fidelity measured on "
        f"{reduce.held_out_steps} held-out steps; {_bytes(reduce.bytes_per_step)} per step"
    ]
    lines += [
        f"layer {layer}: K={f.k}, per-token cosine mean {f.mean:.5f}, 1st percentile {f.p1:.5f}, worst {f.worst:.5f}"
        for layer, f in reduce.fidelity.items()
    ]
    return "\n".join(lines)


def _compression(summary: inspection.Summary) -> str:
    """The codec's ratio, rounded; 'none' for an uncompressed store (its metadata makes the raw ratio ~1)."""
    if summary.codec == "none":
        return "none (uncompressed)"
    return f"{summary.compression_ratio:.2f}x" if summary.compression_ratio else "-"


def _recipe(recipe: inspection.RecipeSummary) -> str:
    dct = f"; JPEG DCT {recipe.jpeg_dct}" if recipe.jpeg_dct else ""  # only where JPEGs were decoded
    if recipe.name == "none":
        return f"none (VGGT input per preprocess{dct})"
    slots = f"; slots {', '.join(recipe.slots)}" if recipe.slots else ""
    mask = "; token mask stored" if recipe.token_mask else ""
    return f"{recipe.name}: matches {recipe.matches}{dct}{slots}{mask}"


def _render_episode(console: Console, report: inspection.EpisodeReport) -> None:
    console.print(
        f"[bold]episode {report.key}[/]: {report.length} steps (rows {report.start}-"
        f"{report.start + report.length - 1}), layer {report.layer}"
    )
    console.print(f"  instruction: {report.instruction}")
    if not report.extracted:
        console.print("  [red]not fully extracted yet; run `sf extract` again to finish it[/]")
        return
    table = Table(title="token L2 norm per step: mean (min-max)", box=box.SIMPLE)
    table.add_column("step", justify="right")
    for view in report.views:
        table.add_column(view, justify="right")
    for step in report.steps:
        table.add_row(str(step.step), *_norms(step))
    table.add_row("all", *_norms(report), style="bold")
    console.print(table)


def _norms(figures: inspection.StepNorms | inspection.EpisodeReport) -> list[str]:
    """Per view: mean (min-max) token L2 norm."""
    return [
        f"{mean:.3f} ({low:.3f}-{high:.3f})"
        for mean, low, high in zip(figures.mean_norm, figures.min_norm, figures.max_norm)
    ]


def _render_check(console: Console, result: inspection.CheckResult) -> None:
    for note in result.notes:
        console.print(f"[yellow]check:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if result.ok:
        console.print(f"[bold green]check: OK[/] ({result.shards_checked}/{result.shards} shards read)")
        return
    console.print(
        f"[bold red]check: FAILED[/] ({len(result.failures)} problem(s), "
        f"{result.shards_checked}/{result.shards} shards read)"
    )
    table = Table(box=box.SIMPLE)
    table.add_column("where", overflow="fold")
    table.add_column("what", overflow="fold")
    for failure in result.failures:
        table.add_row(escape(failure.where), escape(failure.what))  # data text: [..] is not markup
    console.print(table)
    if result.shards_checked == 0 and all(failure.where.endswith("zarr.json") for failure in result.failures):
        return  # its provenance is damaged: re-extracting (--overwrite) is the way, not --repair
    console.print(
        "to repair: run `sf extract` again with the same options and --repair; it redoes every shard "
        "that fails here (a missing shard file is redone by any rerun)",
        highlight=False,
    )


def _render_verify(console: Console, result: inspection.VerifyResult) -> None:
    status = "[bold green]verify: OK[/]" if result.ok else "[bold red]verify: FAILED[/]"
    console.print(
        f"{status} {len(result.steps)} steps recomputed on {result.device}: per-token cosine "
        f"mean {result.mean_cos:.6f}, worst {result.min_cos:.6f} (threshold {result.threshold:.4g})"
    )
    if result.mask_errors:
        console.print(f"  [red]token mask: {result.mask_errors} stored values differ from the recomputed mask[/]")
    for layer, figures in result.layers.items():
        worst = figures.worst
        console.print(
            f"  layer {layer}: mean {figures.mean_cos:.6f}, worst {figures.min_cos:.6f} at episode "
            f"{worst.episode} step {worst.step} view {worst.view} token {worst.token}"
        )
        if figures.recorded is not None:
            low = " [red](below the recorded mean)[/]" if layer in result.below_recorded else ""
            console.print(
                f"    reduced store: recorded held-out mean {figures.recorded.mean:.6f}, "
                f"worst {figures.recorded.worst:.6f} (K={figures.recorded.k}); recomputed "
                f"mean {figures.valid_mean_cos:.6f} on image tokens, 1st percentile "
                f"{figures.p1_cos:.6f}{low}"
            )
    if result.source_changed:
        console.print("  [yellow]the source files changed since extraction (fingerprint differs)[/]")


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
