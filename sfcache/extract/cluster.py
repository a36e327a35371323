"""The Dask cluster of a run: connect to a scheduler or start local workers, then load VGGT on every worker."""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import torch
from distributed import Client, Nanny, Scheduler, SpecCluster
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from sfcache.device import resolve_device
from sfcache.errors import Message, SfcacheError, StoreError, WeightsError, interrupts_deferred
from sfcache.extract.config import ExtractConfig, named
from sfcache.extract.control import write_error_log
from sfcache.extract.report import cause
from sfcache.extract.worker import TASKS_IN_FLIGHT, Job, VGGTWorker, host_of, worker_facts
from sfcache.store import RUN_NAME

WORKER_WAIT_S = 60  # how long a running scheduler may have no workers before we give up
GPU_SHARE = {"GPU": 1 / TASKS_IN_FLIGHT}  # what a task asks of a worker advertising the resource GPU=1


@dataclass(frozen=True)
class Cluster:
    client: Client
    address: str  # the scheduler's, for messages
    workers: int
    device: str  # what each worker uses: cpu | cuda | cuda:N, the same on every worker
    task_resources: dict | None  # a GPU's share (GPU_SHARE) when every worker advertises a GPU resource


def connect(cfg: ExtractConfig, stack: ExitStack) -> Cluster:
    """A Dask client: the given scheduler, or a local cluster of one worker per GPU or N CPU workers."""
    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="30s")
        except OSError as error:
            raise SfcacheError(f"cannot reach Dask scheduler {cfg.scheduler}: {error}") from None
        stack.callback(_close_client, client)
        _wait_for_workers(client, cfg.scheduler)
        infos = client.scheduler_info(n_workers=-1)["workers"].values()
        gpus = min(client.run(torch.cuda.device_count).values())
        if cfg.device.startswith("cuda") and not gpus:
            raise SfcacheError(
                Message(named("device"), f" {cfg.device}, but some workers of {cfg.scheduler} have no GPU")
            )
        device = resolve_device(cfg.device, gpus, named("device"))
        gpu_resources = all(info.get("resources", {}).get("GPU", 0) >= 1 for info in infos)
        return Cluster(
            client,
            cfg.scheduler,
            len(infos),
            str(device),
            GPU_SHARE if device.type == "cuda" and gpu_resources else None,
        )
    device = resolve_device(cfg.device, name=named("device"))
    gpus = _visible_gpus() if device.type == "cuda" else []
    if device.index is not None:  # cuda:N: that GPU alone, which its worker then sees as its only one
        gpus = [gpus[device.index]]
    workers = cfg.workers or (len(gpus) if gpus else 1)
    if gpus:
        if workers > len(gpus):
            raise SfcacheError(
                Message(named("workers"), f" {workers} asks for more GPU workers than the {len(gpus)} GPUs visible")
            )
        specs = {f"gpu{g}": _worker_spec({"CUDA_VISIBLE_DEVICES": g}, {"GPU": 1}) for g in gpus[:workers]}
    else:
        specs = {f"cpu{i}": _worker_spec({}, {}) for i in range(workers)}
    with _interrupts_after_start():
        local = stack.enter_context(
            SpecCluster(
                scheduler={
                    "cls": Scheduler,
                    "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": ":0"},
                },
                workers=specs,
                silence_logs=logging.CRITICAL,
                name="sfcache",
            )
        )
        client = stack.enter_context(Client(local))
    client.wait_for_workers(workers, timeout=600)
    return Cluster(client, local.scheduler_address, workers, device.type, GPU_SHARE if gpus else None)


@contextmanager
def _interrupts_after_start() -> Iterator[None]:
    """Start local worker processes with SIGINT and SIGHUP blocked: they inherit the mask of the thread that starts
    them (Dask's loop thread, started here) and keep it, so Ctrl-C in a terminal, which reaches the whole process
    group, never reaches them; only this client acts on it (stop the tasks, release the lock) instead of every
    worker printing a KeyboardInterrupt traceback. A signal that arrives meanwhile is acted on once the cluster is
    up (`interrupts_deferred`), so that the stack holding the cluster then closes it."""
    quiet = {signal.SIGINT, signal.SIGHUP}
    with interrupts_deferred():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, quiet)
        try:
            resource_tracker.ensure_running()  # started by Dask, it would unblock SIGINT in the thread starting workers
            signal.pthread_sigmask(signal.SIG_BLOCK, quiet)  # ... as ensure_running just did here
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here is noted now


def _close_client(client: Client) -> None:
    """Disconnect without waiting out Dask's reconnect attempts when the scheduler is gone."""
    try:
        client.close(timeout=5 if client.status == "running" else 0.5)
    except Exception:  # already closed or unreachable: nothing left to release
        pass


def _wait_for_workers(client: Client, address: str) -> None:
    """Wait up to WORKER_WAIT_S for a worker to join a running scheduler, saying so after a few seconds."""
    first = min(5, WORKER_WAIT_S)
    try:
        client.wait_for_workers(1, timeout=first)
        return
    except TimeoutError:
        pass
    logging.getLogger("sfcache").warning("waiting for a Dask worker to join %s ...", address)
    try:
        client.wait_for_workers(1, timeout=max(WORKER_WAIT_S - first, 0.01))
    except TimeoutError:
        raise SfcacheError(
            Message(
                f"the Dask scheduler {address} has no workers after {WORKER_WAIT_S} s; start some with "
                f"`dask worker {address}` (on machines that see ",
                named("out"),
                " at the same path), then run again",
            )
        ) from None
    except (CancelledError, CommClosedError, OSError) as error:
        raise lost_scheduler(address, error) from None


def _worker_spec(env: dict, resources: dict) -> dict:
    """One worker process with a Dask thread per task in flight (the model saturates its device; the
    reader and writer threads live inside the plugin)."""
    return {
        "cls": Nanny,
        "options": {
            "nthreads": TASKS_IN_FLIGHT,
            "env": env,
            "resources": resources,
            "memory_limit": 0,
            "silence_logs": logging.CRITICAL,
        },
    }


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def count_workers_per_host(client: Client) -> dict[str, int]:
    return dict(Counter(host_of(address) for address in client.scheduler_info(n_workers=-1)["workers"]))


def load_models(client: Client, job: Job, cfg: ExtractConfig, stack: ExitStack) -> tuple[str, dict, str]:
    """Register the plugin (each worker loads VGGT once); every worker must have loaded the same weights,
    architecture and precision. Returns (plugin name, provenance facts, the workers' devices)."""
    name = f"sfcache-vggt-{uuid.uuid4().hex[:12]}"
    try:
        client.register_plugin(VGGTWorker(job, name), name=name)
    except WeightsError:
        raise
    except Exception as error:  # a worker-side load failure that is not ours: name it, no traceback
        raise WeightsError(
            f"{cfg.vggt}: loading VGGT on the workers failed ({type(error).__name__}: {error})"
        ) from None
    stack.callback(_unregister, client, name)
    facts = list(client.run(worker_facts, name).values())
    provenance = [{k: f[k] for k in ("weights_id", "config", "compute_dtype")} for f in facts]
    if any(p != provenance[0] for p in provenance):
        raise SfcacheError(
            f"Dask workers disagree on the model they loaded (weights, config or precision): {provenance}"
        )
    return name, provenance[0], ", ".join(sorted({f["device"] for f in facts}))


def _unregister(client: Client, name: str) -> None:
    if client.status != "running":  # the scheduler is gone (Dask is trying to reconnect): nothing to free
        return
    try:
        client.unregister_worker_plugin(name)
    except Exception:  # the cluster may already be gone; nothing to free then
        pass


def check_shared_store(cluster: Cluster, job: Job) -> None:
    """Every worker must see the store the client locked, at the same absolute path (its run marker)."""
    try:
        views = cluster.client.run(_store_view, str(job.store), job.run)
    except (CancelledError, CommClosedError, OSError, TimeoutError) as error:
        raise lost_scheduler(cluster.address, error) from None
    for address, (host, problem) in sorted(views.items()):
        if problem:
            raise StoreError(
                Message(
                    f"{job.store}: the Dask worker {address} on host {host} does not see this store ({problem}); ",
                    named("out"),
                    " must be on a file system shared by this client and every worker, at the same absolute path",
                )
            )


def _store_view(store: str, run: str) -> tuple[str, str]:
    """(host, "" when this worker reads this run's id from the store's run marker, else what it finds)."""
    marker = Path(store) / RUN_NAME
    try:
        found = marker.read_text()
    except OSError as err:
        return socket.gethostname(), f"{marker}: {err.strerror}"
    return socket.gethostname(), "" if found == run else f"{marker} holds {found[:40]!r}, not this run's id"


def task_result(future, cluster: Cluster, store: Path) -> Any:
    """A finished task's result (a shard task's TaskReport, a sample task's targets); a lost scheduler, a worker
    dying again and again, or anything else a task raised as one SfcacheError (the traceback of an unexpected error
    goes to the store's error log)."""
    try:
        return future.result()
    except KilledWorker as error:
        raise SfcacheError(
            f"a Dask worker died repeatedly running shards ({error}); finished shards "
            "are kept, run the same command again to resume"
        ) from None
    except (CancelledError, CommClosedError, OSError, TimeoutError) as error:
        if future.status == "error":  # the task's own exception (a worker's file error), not the connection
            raise SfcacheError(
                f"an extraction task failed on its worker ({type(error).__name__}: {error}); "
                "finished shards are kept, fix the cause and run the same command again"
            ) from None
        raise lost_scheduler(cluster.address, error) from None
    except SfcacheError:  # an expected error raised on a worker: already one line
        raise
    except Exception as error:  # noqa: BLE001  anything else a task raised outside its own handling
        trace = "".join(traceback.format_exception(type(error), error, future.traceback()))
        raise SfcacheError(
            Message(
                f"{_task_name(future.key)} failed on its worker (",
                cause(error),
                f"); finished shards are kept; full traceback in {write_error_log(store, trace)}",
            )
        ) from None


def _task_name(key) -> str:
    """What a task key names: 'the task of shards a-b', 'the basis sample task from row r'."""
    parts = str(key).split("-")
    if str(key).startswith("sfcache-shards-"):
        return f"the task of shards {parts[2]}-{parts[3]}"
    if str(key).startswith("sfcache-fit-"):
        return f"the basis sample task from row {parts[2]}"
    return f"task {key}"


class LostScheduler(SfcacheError):
    """The client lost its Dask scheduler."""


def lost_scheduler(address: str, error: BaseException) -> SfcacheError:
    reason = (str(error).strip().splitlines() or [""])[0]
    return LostScheduler(
        Message(
            f"lost the Dask scheduler {address} ({type(error).__name__}: {reason}); finished shards are kept: start "
            "the scheduler and its workers again (or pass another ",
            named("scheduler"),
            ") and run the same command to resume",
        )
    )
