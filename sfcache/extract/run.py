"""The client side of extraction: `extract`, which holds the store while its shard tasks run.

The client (this process) holds the store lock, creates or resumes the store from the run's plan, and hands out
tasks, each owning whole shards (`sfcache.extract.worker`); it confirms each shard's files against the digests
its task reports before it marks the shard done, and stops every task cleanly on a failure.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from distributed import Client, as_completed

from sfcache.errors import Interrupted, Message, SfcacheError, StoreError
from sfcache.extract.cluster import (
    Cluster,
    LostScheduler,
    check_shared_store,
    connect,
    count_workers_per_host,
    load_models,
    task_result,
)
from sfcache.extract.config import ExtractConfig, named, show_grid
from sfcache.extract.control import (
    INTERRUPT_WAIT_S,
    STOP_WAIT_S,
    confirm_written,
    remove_stop_file,
    repair,
    stop_tasks,
    task_error,
    unconfirmed_error,
)
from sfcache.extract.plan import ExtractPlan, make_plan, select
from sfcache.extract.report import ExtractSummary, ShardFailure, TaskReport
from sfcache.extract.worker import TASKS_IN_FLIGHT, Job, run_task, sample_task
from sfcache.options import same_fields
from sfcache.progress import progress_bar
from sfcache.reduce import Moments, check_fidelity, fit, parse_reduce, request, sample_rows, valid_tokens
from sfcache.store import (
    DONE_ARRAY,
    Reduction,
    StoreConfig,
    create_store,
    lock_store,
    open_cache,
    resumable_reduction,
    step_bytes,
    store_run,
)
from sfcache.vggt import VGGTConfig

MAX_SHARDS_PER_TASK = 8
TASKS_PER_WORKER = 4  # enough tasks to balance workers and move the progress bar smoothly
MAX_SHARD_BYTES = 8 << 30  # a shard's targets are held in a worker's memory until written


@dataclass
class _Outcome:
    """What the shard tasks of this run did, as the client confirmed it."""

    written: dict[int, TaskReport] = field(default_factory=dict)  # confirmed and done, with the report naming where
    adopted: list[int] = field(default_factory=list)  # written by an earlier attempt, confirmed now
    failed: list[ShardFailure] = field(default_factory=list)
    seconds: float = 0.0


def extract(cfg: ExtractConfig, progress: bool = True) -> ExtractSummary:
    """Extract every selected step into `cfg.out`, resuming shards already done; returns what it did.

    Raises SourceError (bad data, unless skip_bad), StoreError (lock, write failure),
    ConfigMismatch (store made differently), WeightsError.
    """
    if cfg.vggt is None:
        raise SfcacheError(
            Message(
                named("vggt"),
                " is needed to extract: a checkpoint path, facebook/VGGT-1B, or random:tiny for a test "
                "(--dry-run sizes the store without it)",
            )
        )
    started = time.perf_counter()
    selection = select(cfg)
    with lock_store(cfg.out), store_run(cfg.out) as run, ExitStack() as stack:
        remove_stop_file(cfg.out)
        cluster_started = time.perf_counter()
        cluster = connect(cfg, stack)
        job = Job(
            source=selection.source,
            weights=cfg.vggt,
            device=cluster.device,
            recipe=selection.recipe,
            layout=selection.layout,
            **same_fields(cfg, ("layers", "grid", "preprocess", "compute_dtype", "batch_size", "skip_bad")),
            store=cfg.out.resolve(),
            workers_per_host=count_workers_per_host(cluster.client),
            run=run,
            tasks_in_flight=TASKS_IN_FLIGHT,
        )
        check_shared_store(cluster, job)
        plugin, facts, devices = load_models(cluster.client, job, cfg, stack)
        cluster_seconds = time.perf_counter() - cluster_started
        plan = make_plan(cfg, selection, VGGTConfig.from_dict(facts["config"]), cluster.device)
        store_config = plan.store_config(facts)
        _check_shard_size(store_config, cfg)
        fitted, k = "none", parse_reduce(cfg.reduce)
        if isinstance(k, int) and k > plan.model.out_channels:  # before computing any sample
            raise SfcacheError(
                Message(
                    named("reduce"),
                    f" pca:{k}: this VGGT's targets have {plan.model.out_channels} channels; "
                    f"choose K <= {plan.model.out_channels}",
                )
            )
        if k is not None:
            store_config = replace(
                store_config, reduce=Reduction(request(cfg.reduce, cfg.min_cosine, store_config.num_steps))
            )
            reduction = resumable_reduction(cfg.out, store_config, cfg.overwrite)
            fitted = "reused" if reduction is not None else "fitted"
            reduction = reduction or _fit_basis(cluster, plugin, store_config, cfg.batch_size, progress, cfg.out)
            check_fidelity(reduction)
            store_config = replace(store_config, reduce=reduction)
        cache = create_store(cfg.out, store_config, overwrite=cfg.overwrite)
        repaired = repair(cache, cfg.repair)
        pending = [int(s) for s in np.flatnonzero(~cache.done_shards())]
        outcome = _run_shards(cluster, cache, plugin, pending, progress, cfg.skip_bad, run)
    return _summary(plan, outcome, run, cluster, devices, fitted, repaired, cluster_seconds, started)


def _summary(
    plan: ExtractPlan,
    outcome: _Outcome,
    run: str,
    cluster: Cluster,
    devices: str,
    basis: str,
    repaired: list[dict],
    cluster_seconds: float,
    started: float,
) -> ExtractSummary:
    """The store's state after the run (read again) with this run's work and timing."""
    final = open_cache(plan.config.out)
    extracted = _steps_of(final, list(outcome.written))
    return ExtractSummary(
        store=str(plan.config.out),
        format=plan.source.format,
        views=list(plan.selection.layout),
        recipe=plan.selection.recipe.name,
        layers=list(plan.layers),
        episodes=len(plan.selection.episodes),
        steps=final.num_steps,
        shards_done=int(final.done_shards().sum()),
        shards=final.num_shards,
        extracted_steps=extracted,
        adopted_steps=_steps_of(final, outcome.adopted),
        already_done_steps=_steps_of(final, np.flatnonzero(final.done_shards()).tolist()) - extracted,
        failed=[asdict(failure) for failure in outcome.failed],
        repaired=repaired,
        run=run,
        skipped_episodes=[str(e) for e in plan.source.skipped],
        basis=basis,
        reduce=final.attrs["targets"].get("reduce"),
        missing_episodes=final.missing_episodes(),
        workers=cluster.workers,
        device=devices,
        weights_id=final.provenance.vggt.weights_id,
        cluster_startup_s=round(cluster_seconds, 3),
        extract_s=round(outcome.seconds, 3),
        steps_per_s=round(extracted / outcome.seconds, 3) if outcome.seconds else 0.0,
        total_s=round(time.perf_counter() - started, 3),
    )


def _check_shard_size(config: StoreConfig, cfg: ExtractConfig) -> None:
    """Refuse, before any task, a shard too large for a worker's memory (it holds a shard's targets until written:
    in the stored dtype, or float32 at full C with --reduce, projected only at the write)."""
    held = cfg.dtype if parse_reduce(cfg.reduce) is None else "float32"
    tokens = config.grid[0] * config.grid[1]
    per_step = step_bytes(len(config.views), tokens, config.channels, held, len(config.layers), config.token_mask)
    steps = min(cfg.steps_per_shard, config.num_steps)
    if per_step * steps > MAX_SHARD_BYTES:
        raise SfcacheError(
            Message(
                named("steps_per_shard"),
                f" {cfg.steps_per_shard} with ",
                named("grid"),
                f" {show_grid(config.grid)}: a shard would hold {per_step * steps / 2**30:.1f} GiB of targets "
                f"({per_step / 2**20:.1f} MiB per step of {held}), kept in a worker's memory until written; keep it "
                f"under {MAX_SHARD_BYTES >> 30} GiB (lower ",
                named("steps_per_shard"),
                " or ",
                named("grid"),
                ")",
            )
        )


def _fit_basis(
    cluster: Cluster, plugin: str, config: StoreConfig, batch_size: int, progress: bool, store: Path
) -> Reduction:
    """Fit the PCA basis on the workers' exact targets of the sample rows (sfcache.reduce.sample_rows).

    One task per batch of `batch_size` sample rows; results are folded in submission order, so the
    float64 sums and the basis are the same whatever the number of workers or the finishing order.
    """
    fit_rows, held_rows = sample_rows(config.num_steps)
    rows = np.union1d(fit_rows, held_rows)
    episodes = [list(e) for e in config.episodes]
    futures = [
        cluster.client.submit(
            sample_task,
            plugin,
            episodes,
            rows[i : i + batch_size].tolist(),
            key=f"sfcache-fit-{int(rows[i])}-{plugin}",
            resources=cluster.task_resources,
            retries=2,
            pure=False,
        )
        for i in range(0, rows.size, batch_size)
    ]
    moments = {layer: Moments(config.channels) for layer in config.layers}
    held: dict[int, list] = {layer: [] for layer in config.layers}
    held_masks: list = []
    bar = progress_bar("steps") if progress else None
    with bar or nullcontext(), _cancelled_on_exit(cluster.client, futures):
        task = bar.add_task("fit basis", total=int(rows.size)) if bar else None
        for start, future in zip(range(0, rows.size, batch_size), futures):
            targets, mask = task_result(future, cluster, store)  # a lost scheduler or dying workers: one line
            batch = rows[start : start + batch_size]
            is_held = np.isin(batch, held_rows)
            for layer, values in targets.items():
                moments[layer].add(valid_tokens(values[~is_held], None if mask is None else mask[~is_held]))
                held[layer].append(values[is_held])
            held_masks.append(None if mask is None else mask[is_held])
            if bar:
                bar.advance(task, len(batch))
    masks = None if held_masks[0] is None else np.concatenate(held_masks)
    return fit(
        config.reduce.request, moments, {layer: (np.concatenate(v), masks) for layer, v in held.items()}, config.dtype
    )


@contextmanager
def _cancelled_on_exit(client: Client, futures: list):
    """Cancel what is left of `futures` when the block ends early (an error, an interrupt)."""
    try:
        yield
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            try:
                client.cancel(pending)
            except Exception:  # noqa: BLE001  the scheduler may be gone; nothing is left to cancel then
                pass


def _steps_of(cache, shards: list[int]) -> int:
    return sum(cache.shard_rows(s).stop - cache.shard_rows(s).start for s in shards)


def _run_shards(
    cluster: Cluster, cache, plugin: str, pending: list[int], progress: bool, skip_bad: bool, run: str = ""
) -> _Outcome:
    """Submit shard-range tasks, advance the bar per batch, confirm and mark done each task's shards as its report
    comes in, stop everything cleanly on a failure."""
    per_task = max(1, min(MAX_SHARDS_PER_TASK, -(-len(pending) // (cluster.workers * TASKS_PER_WORKER))))
    groups = _consecutive_groups(pending, per_task)
    started = time.perf_counter()
    futures = [
        cluster.client.submit(
            run_task,
            plugin,
            group,
            key=f"sfcache-shards-{group[0]}-{group[-1]}-{plugin}",
            resources=cluster.task_resources,
            retries=2,
            pure=False,
        )
        for group in groups
    ]
    outcome = _Outcome()
    unconfirmed: list[tuple] = []  # (shard, file, how, report) of written shards this client cannot read back
    total = _steps_of(cache, pending)
    bar = progress_bar("steps") if progress else None
    topic = f"sfcache-progress-{run}"
    interrupted = False
    try:
        with bar or nullcontext():
            task = bar.add_task("extract", total=total) if bar else None
            if bar:
                cluster.client.subscribe_topic(topic, lambda event: bar.advance(task, event[1]))
            for future in as_completed(futures):
                report: TaskReport = task_result(future, cluster, cache.path)
                outcome.failed += report.failed
                try:
                    bad = confirm_written(cache, report)
                except StoreError:  # the store turned unwritable: the task's own write error says more
                    if not report.error:
                        raise
                    bad = [(shard, DONE_ARRAY, "not marked done", report) for shard in report.written]
                unconfirmed += bad
                refused = {b[0] for b in bad}
                outcome.written.update({s: report for s in report.written if s not in refused})
                outcome.adopted += report.adopted
                if bar:  # per-batch events may count a batch twice after a worker death: settle on shards
                    bar.update(
                        task,
                        completed=min(total, max(bar.tasks[0].completed, _steps_of(cache, list(outcome.written)))),
                    )
                if report.error:
                    raise task_error(futures, report, cache.path)
                if report.failed and not skip_bad:
                    raise report.failed[0].error()
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        raise
    except LostScheduler:  # nothing to stop from here; the run fence stops what still runs out there
        raise
    except BaseException:
        stop_tasks(cache.path, cluster.client, futures, STOP_WAIT_S)
        raise
    finally:
        if interrupted:
            stop_tasks(cache.path, cluster.client, futures, INTERRUPT_WAIT_S)
        if bar:
            _unsubscribe(cluster.client, topic)
    if unconfirmed:
        raise unconfirmed_error(cache, unconfirmed)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _unsubscribe(client: Client, topic: str) -> None:
    if client.status != "running":
        return
    try:
        client.unsubscribe_topic(topic)
    except Exception:  # the cluster may already be gone
        pass


def _consecutive_groups(shards: list[int], size: int) -> list[list[int]]:
    """Runs of consecutive shard ids, at most `size` each (consecutive shards share episode reads)."""
    groups: list[list[int]] = []
    for shard in shards:
        if groups and len(groups[-1]) < size and groups[-1][-1] == shard - 1:
            groups[-1].append(shard)
        else:
            groups.append([shard])
    return groups
