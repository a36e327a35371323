import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import torch

CHILD = "SFCACHE_TEST_CHILD"
# Dask's statistical profiler samples every thread's stack every 10 ms; on CPython 3.11 it can deadlock with the
# garbage collector (python/cpython#106883, dask/distributed#8616) in a test that runs a cluster in-process.
# The environment reaches the worker processes the tests start, and this process's config below.
os.environ["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"
dask.config.refresh()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, values stay bitwise comparable between in-process runs,
    and the tests do not fight the Dask worker processes they start for the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run a test marked `own_process` in a fresh interpreter: MuJoCo 2.3.7 (the LIBERO simulator) and
    TensorFlow 2.x crash when both are loaded into one process, and the suite imports TensorFlow elsewhere;
    a fork of this long-lived process copies threads other tests left running (Dask, zarr IO) with their locks."""
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(CHILD):
        return None
    root = Path(pyfuncitem.config.rootpath)
    try:  # the child's own pytest-timeout (pyproject) ends a stuck test well inside this parent's limit
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-x",
                "-o",
                "timeout=200",
                pyfuncitem.nodeid,
            ],
            cwd=root,
            env={**os.environ, CHILD: "1"},
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(
            f"in its own process, {pyfuncitem.nodeid} did not end within 240 s:\n{expired.stdout or ''}", pytrace=False
        )
    if result.returncode != 0:
        pytest.fail(
            f"in its own process, {pyfuncitem.nodeid} failed:\n{result.stdout[-6000:]}{result.stderr[-3000:]}",
            pytrace=False,
        )
    if " passed" not in result.stdout:
        last = result.stdout.strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"in its own process: {last[0]}")
    return True
