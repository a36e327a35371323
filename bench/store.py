"""Writer throughput at real shapes: `StoreWriter.write_shard` MiB/s against a plain write + fsync of the same bytes.

Real shapes: [steps, 2 views, 256 tokens, 2048 channels] (VGGT-1B, 16x16 grid), 32 steps per shard, in both
presets (the store does not depend on the model). `write_mib_per_s_<dtype>` is extraction's path: values
already cast on the model's device (`sfcache.device.encode_on_device`), no codec, no checksum. The other rows
add what an option costs: `_checksum` (CRC32C per step), `_zstd`, `_blosc-zstd`, and `_cpu_encode` (float32
handed to the writer, cast there on the CPU, as before device casting). MiB are the stored bytes (values
and int8 scales); the baseline writes exactly those bytes to one file per shard and fsyncs it and its folder.
Every write row includes what every store now does per shard: read the files back and record their CRC32C digests.

Integrity rows (float16, real shape, files in the page cache so that only the CPU cost shows):
`digest_mib_per_s` is `Cache.shard_digests` (read + CRC32C: what the client does per shard before it marks it
done, `--check` and `--repair` per done shard) against a plain read of the same files; `read_mib_per_s_verify`
is a first read of each shard through `open_cache(verify=True)` against the same reads without it;
`read_mib_per_s_checksum` is a `--checksum` store's read (a CRC32C per step) against a store without.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench import best_seconds, preset_settings, scratch_store_config
from sfcache.store import StoreConfig, create_store, encode, lock_store, open_cache

PRESETS = {"tiny": {"shards": 1, "repeats": 3}, "vggt-1b": {"shards": 4, "repeats": 3}}
STEPS_PER_SHARD, VIEWS, TOKENS, CHANNELS = 32, 2, 256, 2048
VARIANTS = (
    ("", "none", False, True),
    ("_checksum", "none", True, True),
    ("_zstd", "zstd", False, True),
    ("_blosc-zstd", "blosc-zstd", False, True),
    ("_cpu_encode", "none", False, False),
)
MIB = 1 << 20


def run(workdir: Path, preset: str) -> list[dict]:
    settings = preset_settings(PRESETS, preset, "store")
    shards, repeats = settings["shards"], settings["repeats"]
    steps = shards * STEPS_PER_SHARD
    rng = np.random.default_rng(0)
    values = rng.standard_normal((STEPS_PER_SHARD, VIEWS, TOKENS, CHANNELS), dtype=np.float32)
    rows = []
    for dtype in ("float16", "bfloat16", "int8"):
        encoded = encode(values, dtype)
        nbytes = sum(part.nbytes for part in encoded if part is not None) * shards
        for suffix, codec, checksum, on_device in VARIANTS:
            if dtype == "bfloat16" and suffix not in ("", "_cpu_encode"):
                continue  # the codecs and checksum cost the same per byte as for float16
            given = encoded if on_device else values

            def write(k: int) -> None:
                path = workdir / f"store-{dtype}{suffix}-{k}"
                with lock_store(path):
                    cache = create_store(path, _config(steps, dtype, codec, checksum))
                    for shard in range(shards):
                        cache.write_shard(shard, {0: given})

            seconds, plain = _best_interleaved(
                repeats, write, lambda k: _plain_write(workdir / f"plain-{dtype}{suffix}-{k}", encoded, shards)
            )
            notes = (
                f"{steps} steps [{steps}, {VIEWS}, {TOKENS}, {CHANNELS}] {dtype}, {STEPS_PER_SHARD} steps per "
                f"shard, codec {codec}, checksum {'crc32c' if checksum else 'none'}, "
                f"{'pre-encoded (device cast)' if on_device else 'float32 in, cast on the CPU'}; "
                f"{nbytes / steps / MIB:.2f} MiB/step, best of {repeats}; baseline: plain write + fsync of the "
                "same bytes, interleaved with these writes"
            )
            rows.append(
                {
                    "bench": "store",
                    "metric": f"write_mib_per_s_{dtype}{suffix}",
                    "value": nbytes / MIB / seconds,
                    "baseline": nbytes / MIB / plain,
                    "ratio": plain / seconds,
                    "unit": "MiB/s",
                    "notes": notes,
                }
            )
            shutil.rmtree(workdir, ignore_errors=True)  # keep the disk use to one variant's files
            workdir.mkdir(parents=True, exist_ok=True)
    rows += _in_memory(encode(values, "float16"), shards, repeats)
    rows += _integrity(workdir, encode(values, "float16"), shards, repeats)
    return rows


def _integrity(workdir: Path, encoded: tuple, shards: int, repeats: int) -> list[dict]:
    """What digests and --checksum cost on the read side, at real shape (see the module docstring)."""
    steps, nbytes = shards * STEPS_PER_SHARD, encoded[0].nbytes * shards
    caches = {}
    for checksum in (False, True):
        path = workdir / f"integrity-{checksum}"
        with lock_store(path):
            cache = create_store(path, _config(steps, "float16", "none", checksum))
            for shard in range(shards):
                cache.write_shard(shard, {0: encoded})
        caches[checksum] = path
    plain, files = caches[False], [open_cache(caches[False]).shard_file("targets/layer_0", s) for s in range(shards)]
    everything = np.arange(steps)

    def digests() -> None:
        cache = open_cache(plain)
        for shard in range(shards):
            cache.shard_digests(shard)

    def plain_reads() -> None:
        for file in files:
            file.read_bytes()

    def read(path: Path, verify: bool = False):
        return lambda: open_cache(path, verify=verify).read_rows(everything)  # a new Cache: every shard checked

    plain_reads()  # into the page cache
    digest_s, reads_s = _best_interleaved(repeats, lambda k: digests(), lambda k: plain_reads())
    verify_s, unverified_s = _best_interleaved(repeats, lambda k: read(plain, True)(), lambda k: read(plain)())
    checksum_s, without_s = _best_interleaved(repeats, lambda k: read(caches[True])(), lambda k: read(plain)())
    shape = f"{steps} steps [{steps}, {VIEWS}, {TOKENS}, {CHANNELS}] float16, {STEPS_PER_SHARD} steps per shard"
    mib = nbytes / MIB
    return [
        {
            "bench": "store",
            "metric": "digest_mib_per_s",
            "value": mib / digest_s,
            "baseline": mib / reads_s,
            "ratio": reads_s / digest_s,
            "unit": "MiB/s",
            "notes": f"Cache.shard_digests (read + CRC32C of each shard file) over {shape}, page cache warm; "
            f"baseline: plain read of the same files; best of {repeats}",
        },
        {
            "bench": "store",
            "metric": "read_mib_per_s_verify",
            "value": mib / verify_s,
            "baseline": mib / unverified_s,
            "ratio": unverified_s / verify_s,
            "unit": "MiB/s",
            "notes": f"read_rows of every row, first read of each shard by open_cache(verify=True) (digests "
            f"compared), {shape}, page cache warm; baseline: the same reads without verify; best of {repeats}",
        },
        {
            "bench": "store",
            "metric": "read_mib_per_s_checksum",
            "value": mib / checksum_s,
            "baseline": mib / without_s,
            "ratio": without_s / checksum_s,
            "unit": "MiB/s",
            "notes": f"read_rows of every row of a --checksum store (CRC32C per step checked), {shape}, page "
            f"cache warm; baseline: the same reads of a store without --checksum; best of {repeats}",
        },
    ]


def _in_memory(encoded: tuple, shards: int, repeats: int) -> list[dict]:
    """The writer's own ceiling: float16 into tmpfs (/dev/shm), where no disk limits either side."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return []
    steps, nbytes = shards * STEPS_PER_SHARD, encoded[0].nbytes * shards
    with tempfile.TemporaryDirectory(dir=shm, prefix="sfbench-store-") as folder:

        def write(k: int) -> None:
            path = Path(folder) / f"store-{k}"
            with lock_store(path):
                cache = create_store(path, _config(steps, "float16", "none", False))
                for shard in range(shards):
                    cache.write_shard(shard, {0: encoded})
            shutil.rmtree(path)

        def plain(k: int) -> None:
            _plain_write(Path(folder) / f"plain-{k}", encoded, shards)
            shutil.rmtree(Path(folder) / f"plain-{k}")

        seconds, baseline = _best_interleaved(repeats, write, plain)
    return [
        {
            "bench": "store",
            "metric": "write_mib_per_s_float16_tmpfs",
            "value": nbytes / MIB / seconds,
            "baseline": nbytes / MIB / baseline,
            "ratio": baseline / seconds,
            "unit": "MiB/s",
            "notes": f"as write_mib_per_s_float16, into tmpfs /dev/shm: the writer's own ceiling without a disk; "
            f"best of {repeats}; baseline: plain write of the same bytes there",
        }
    ]


def _best_interleaved(repeats: int, work, baseline) -> tuple[float, float]:
    """Fastest seconds of `work` and of `baseline`, run alternately (a shared disk's load hits both alike)."""
    times = [(best_seconds(1, lambda: work(k)), best_seconds(1, lambda: baseline(k))) for k in range(repeats)]
    return min(t for t, _ in times), min(t for _, t in times)


def _plain_write(folder: Path, encoded: tuple, shards: int) -> None:
    folder.mkdir(parents=True)
    for shard in range(shards):
        with open(folder / f"shard{shard}", "wb") as f:
            for part in encoded:
                if part is not None:
                    f.write(memoryview(np.ascontiguousarray(part)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _config(steps: int, dtype: str, codec: str, checksum: bool) -> StoreConfig:
    return scratch_store_config(
        steps, CHANNELS, dtype=dtype, codec=codec, checksum=checksum, steps_per_shard=STEPS_PER_SHARD
    )
