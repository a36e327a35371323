"""The README's SLURM recipe, run for real: a single-node SLURM from Debian's slurm-wlm, brought up in a
temporary folder, drives dask-jobqueue's SLURMCluster, and an extraction through it equals a local one.

Optional (`pytest -m slurm`, as root, after `apt-get install slurm-wlm` and `pip install 'sfcache[slurm]'`);
not part of `.ci/run`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from sfcache.cli.main import app
from sfcache.extract import ExtractConfig, extract
from sfcache.sources.synthetic import write_libero_hdf5
from tests.test_faults import assert_equal_stores

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scancel")
MISSING = [name for name in BINARIES if shutil.which(name) is None]
if importlib.util.find_spec("dask_jobqueue") is None:
    MISSING.append("dask_jobqueue (pip install 'sfcache[slurm]')")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM test needs {', '.join(MISSING)} (apt-get install slurm-wlm)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="SLURM test starts munged, slurmctld and slurmd: run it as root"),
]

UP_S = 30  # for the daemons and the node to come up
JOB_S = 90  # for the SLURM job's Dask worker to join
DOWN_S = 10  # for jobs to end on teardown


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    memory_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)  # below what slurmd measures, or it drains
    return f"""ClusterName=sfcache
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _wait(what: str, done, timeout: float, log: Path | None = None) -> None:
    """Poll `done()` until it holds; fail naming `what` (and the daemon's log tail) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            pytest.fail(f"{what} not within {timeout} s\n{tail}")
        time.sleep(0.5)


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout


def _stop(conf: Path, daemons: list[subprocess.Popen]) -> None:
    """Cancel every job, stop the daemons, then anything left that runs under this SLURM (job steps, workers)."""
    try:
        _run("scancel", "--user=root")
        deadline = time.monotonic() + DOWN_S
        while _run("squeue", "-h").strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass
    for daemon in reversed(daemons):
        daemon.terminate()
        try:
            daemon.wait(timeout=DOWN_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=DOWN_S)
    for process in psutil.process_iter():
        try:
            if process.environ().get("SLURM_CONF") == str(conf):
                process.send_signal(signal.SIGKILL)
        except (psutil.Error, OSError):
            pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on this host, all files in tmp; yields slurm.conf and is always torn down."""
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    host = socket.gethostname().split(".")[0]
    conf.write_text(_slurm_conf(root, host, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)  # sbatch/squeue run by dask-jobqueue find this SLURM
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(
            subprocess.Popen(
                [
                    "munged",
                    "-F",
                    "-f",
                    f"--key-file={key}",
                    f"--socket={munge_socket}",
                    f"--pid-file={root}/munge/munged.pid",
                    f"--log-file={root}/munge/munged.log",
                    f"--seed-file={root}/munge/munged.seed",
                ],
                env=env,
            )
        )
        _wait("munged's socket", munge_socket.exists, UP_S, root / "munge" / "munged.log")
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env))
        _wait(
            "the SLURM node idle in sinfo",
            lambda: _run("sinfo", "-h", "-o", "%t").strip() == "idle",
            UP_S,
            root / "slurmd.log",
        )
        yield conf
    finally:
        _stop(conf, daemons)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def test_srun_runs_on_the_node(slurm):
    assert _run("srun", "-N1", "-n1", "hostname").strip() == socket.gethostname()


def test_extract_through_slurmcluster_equals_a_local_run(slurm, tmp_path):
    from dask_jobqueue import SLURMCluster

    data = write_libero_hdf5(tmp_path / "data", tasks=1, demos=2, steps=4, size=64).path
    local = extract(
        ExtractConfig(
            source=data, out=tmp_path / "local", vggt="random:tiny", steps_per_shard=2, batch_size=2, workers=1
        ),
        progress=False,
    )
    # The README's CPU-only recipe; the store is on a path the job sees (same host), the job runs this Python.
    with SLURMCluster(
        cores=1,
        processes=1,
        memory="6GB",
        walltime="00:10:00",
        interface="lo",
        log_directory=str(tmp_path / "jobs"),
        scheduler_options={"dashboard_address": ":0"},
    ) as cluster:
        cluster.scale(jobs=1)
        with cluster.get_client() as client:
            client.wait_for_workers(1, timeout=JOB_S)
            jobs = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert len(jobs) == 1 and all(jobs.values()), jobs  # the worker is a SLURM job, not a local process
        result = CliRunner().invoke(
            app,
            [
                "extract",
                str(data),
                "--out",
                str(tmp_path / "slurm"),
                "--vggt",
                "random:tiny",
                "--steps-per-shard",
                "2",
                "--batch-size",
                "2",
                "--scheduler",
                cluster.scheduler_address,
            ],
        )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert local.shards_done == 4
    assert_equal_stores(tmp_path / "slurm", tmp_path / "local")


def test_gpu_recipe_asks_slurm_and_dask_for_one_gpu(slurm):
    """The README's GPU-node arguments reach the job script: SLURM grants a GPU, Dask counts it as GPU=1."""
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(
        cores=8,
        processes=1,
        memory="6GB",
        walltime="08:00:00",
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1"],
        scheduler_options={"dashboard_address": ":0"},
    ) as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script.splitlines()
    assert "--resources GPU=1" in script
