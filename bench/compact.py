"""Compact stores side by side on the same features: PCA (K x float16/int8) and a lossy float codec.

Two feature sets, each fitted and measured exactly as `sf extract --reduce` does (sfcache.reduce: evenly
spread sample, every 4th sample step held out, cosine through the stored dtype on the held-out steps):
- VGGT features of random weights over a LIBERO-RLDS fixture (the extraction bench's bare loop). Random
  weights are NOT representative: trained VGGT features have other spectra; only the user's own store,
  which records its fidelity, says what a K costs on real data.
- synthetic low-rank-plus-noise at VGGT-1B's shape (2 views x 256 tokens x 2048 channels): 256 signal
  directions with variances ~ 1/j and isotropic noise carrying 5% of the energy, a small mean.
Bytes per step are the stored (uncompressed) bytes, baseline the float16 full store; projected LIBERO size
is bytes per step x 273,465 steps plus the bases. The lossy codec is numcodecs BitRound (float32 mantissa
rounded to `keepbits`, then zstd) in a Zarr v3 array; zfpy does not fit (see `_bitround`).
"""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec
from zarr.codecs.numcodecs import BitRound

from bench import preset_settings, row
from bench.extract import _bare_loop
from sfcache.extract import torch_threads
from sfcache.inspection import token_cosine
from sfcache.reduce import Moments, measure, sample_rows
from sfcache.sources.synthetic import write_libero_rlds
from sfcache.store import step_bytes

PRESETS = {
    "tiny": {"weights": "random:tiny", "episodes": 4, "steps": 12, "batch_size": 4, "synthetic_steps": 32},
    "vggt-1b": {"weights": "random:vggt-1b", "episodes": 8, "steps": 32, "batch_size": 8, "synthetic_steps": 128},
}
KS = (64, 128, 256, 512)
DTYPES = ("float16", "int8")
KEEPBITS = (3, 5, 7)
LIBERO_STEPS, LIBERO_VIEWS, LIBERO_TOKENS, LIBERO_CHANNELS = 273_465, 2, 256, 2048


def run(workdir: Path, preset: str) -> list[dict]:
    settings = preset_settings(PRESETS, preset, "compact")
    workdir = Path(workdir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch_threads(1)} torch threads)"
    data = write_libero_rlds(workdir / "data", episodes=settings["episodes"], steps=settings["steps"]).path
    vggt, _ = _bare_loop(data, settings["weights"], settings["batch_size"], device)
    rows = _compare(workdir, vggt, f"vggt-random ({settings['weights']}, NOT representative)", "vggt_random", where)
    rows += _compare(
        workdir, low_rank_features(settings["synthetic_steps"]), "synthetic rank-256 + 5% noise", "synthetic", where
    )
    return rows


def low_rank_features(steps: int, rank: int = 256, noise_share: float = 0.05, seed: int = 0) -> np.ndarray:
    """float32 [steps, 2, 256, 2048]: mean + `rank` directions with variance 1/j + noise of `noise_share` of the energy.

    The mean is as small as the noise (a large common offset would make every cosine look good)."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((LIBERO_CHANNELS, rank)))[0].T.astype(np.float32)
    spread = (1.0 / np.arange(1, rank + 1)) ** 0.5
    size = (steps, LIBERO_VIEWS, LIBERO_TOKENS)
    signal = (rng.standard_normal((*size, rank)).astype(np.float32) * spread.astype(np.float32)) @ directions
    sigma = np.sqrt(noise_share / (1 - noise_share) * (spread**2).sum() / LIBERO_CHANNELS)
    offset = rng.standard_normal(LIBERO_CHANNELS).astype(np.float32) * np.float32(sigma)
    return offset + signal + np.float32(sigma) * rng.standard_normal((*size, LIBERO_CHANNELS), dtype=np.float32)


def _compare(workdir: Path, features: np.ndarray, label: str, name: str, where: str) -> list[dict]:
    """PCA at each K and dtype, and BitRound, on `features` [N, V, n, C]; rows against the float16 full store."""
    figure = partial(row, "compact", device=where)
    steps, views, tokens, channels = features.shape
    fit_rows, held_rows = sample_rows(steps)
    moments = Moments(channels)
    moments.add(features[fit_rows].reshape(-1, channels))
    mean, components = moments.principal()
    held = features[held_rows]
    full_bytes = step_bytes(views, tokens, channels, "float16", 1, False)
    full_cosine = float(token_cosine(held.astype(np.float16).astype(np.float32), held).mean())
    libero_full = step_bytes(LIBERO_VIEWS, LIBERO_TOKENS, LIBERO_CHANNELS, "float16", 1, False) * LIBERO_STEPS
    context = f"{label}; {steps} steps x {views} views x {tokens} tokens x {channels} ch, held out {held_rows.size}"
    rows = []
    for k in KS:
        if k > channels:
            continue
        for dtype in DTYPES:
            figures = measure(held, None, mean, components[:k], dtype)
            stored = step_bytes(views, tokens, k, dtype, 1, False)
            libero = (
                step_bytes(LIBERO_VIEWS, LIBERO_TOKENS, k, dtype, 1, False) * LIBERO_STEPS
                + (k + 1) * LIBERO_CHANNELS * 4
            )
            notes = (
                f"{context}; p1 {figures['p1']:.4f}, worst {figures['worst']:.4f}; LIBERO projected "
                f"{libero / 2**30:.1f} GiB vs {libero_full / 2**30:.1f} GiB float16"
            )
            rows += [
                figure(f"pca{k}_{dtype}_{name}_cosine_mean", figures["mean"], full_cosine, "cosine", notes),
                figure(f"pca{k}_{dtype}_{name}_bytes_per_step", stored, full_bytes, "bytes", notes),
            ]
    for keepbits in KEEPBITS:
        on_disk, back = _bitround(workdir / f"bitround-{name}-{keepbits}", held, keepbits)
        cosine = token_cosine(back, held)
        per_step = on_disk / held.shape[0]
        libero = per_step / (views * tokens * channels) * LIBERO_VIEWS * LIBERO_TOKENS * LIBERO_CHANNELS * LIBERO_STEPS
        notes = (
            f"{context}; float32 BitRound(keepbits={keepbits}) + zstd, bytes on disk; p1 "
            f"{np.percentile(cosine, 1):.4f}, worst {cosine.min():.4f}; LIBERO projected {libero / 2**30:.1f} GiB"
        )
        rows += [
            figure(f"bitround{keepbits}_{name}_cosine_mean", cosine.mean(), full_cosine, "cosine", notes),
            figure(f"bitround{keepbits}_{name}_bytes_per_step", per_step, full_bytes, "bytes", notes),
        ]
    return rows


def _bitround(path: Path, values: np.ndarray, keepbits: int) -> tuple[int, np.ndarray]:
    """Bytes on disk and the read-back values of a Zarr v3 float32 array with BitRound + zstd, one step per chunk.

    zfpy was tried and does not fit: numcodecs 0.16 disables it under NumPy 2, and zfpy 1.0.1.post0's
    version string makes `import numcodecs` (hence zarr) fail.
    """
    with warnings.catch_warnings():  # "numcodecs codecs are not in the Zarr v3 specification": known, reported
        warnings.simplefilter("ignore")
        array = zarr.create_array(
            str(path),
            shape=values.shape,
            dtype="float32",
            chunks=(1, *values.shape[1:]),
            shards=values.shape,
            filters=[BitRound(keepbits=keepbits)],
            compressors=[ZstdCodec(level=3)],
            fill_value=0,
        )
    array[...] = values
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "c" in f.relative_to(path).parts)
    return on_disk, array[...]
