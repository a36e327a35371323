"""Dask-parallel extraction: VGGT once over every step of a dataset, pooled targets into a Zarr store.

`config` is what was asked (`ExtractConfig`), `plan` what a run derives from it (`--dry-run` prints it), `run`
the client (`extract`), `cluster` its Dask workers, `worker` the plugin running tasks on them, `report` what tasks
and runs report, `control` stopping, repairing and confirming shards.
"""

from sfcache.extract.config import ExtractConfig
from sfcache.extract.control import STOP_NAME
from sfcache.extract.plan import ExtractPlan, plan
from sfcache.extract.report import ExtractSummary, ShardFailure, TaskReport
from sfcache.extract.run import extract
from sfcache.extract.worker import TASKS_IN_FLIGHT, VGGTWorker, torch_threads

__all__ = [
    "STOP_NAME",
    "TASKS_IN_FLIGHT",
    "ExtractConfig",
    "ExtractPlan",
    "ExtractSummary",
    "ShardFailure",
    "TaskReport",
    "VGGTWorker",
    "extract",
    "plan",
    "torch_threads",
]
