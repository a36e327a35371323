"""Compact stores (`sf extract --reduce pca:K | pca:auto`): per-layer PCA basis, coefficients stored, targets rebuilt.

Why: a LIBERO cache is ~55x the dataset it comes from, and transformer features are far from full rank
over their channels, so K << C coefficients per token and one [K, C] basis plus a mean per layer keep
most of the signal. The basis is fitted on a deterministic sample of steps spread evenly over the whole
dataset (computed by the Dask workers in fixed batches and summed in a fixed order), so a rerun after a
kill during the fit gets a bit-identical basis; once stored, a basis is reused, never refitted. Every
`HELD_OUT_EVERY`-th sample step is held out: the fidelity recorded in the store (mean, 1st percentile and
worst per-token cosine to the exact targets, through the stored dtype) is measured on those steps only.
"""

from __future__ import annotations

import logging

import numpy as np

from sfcache.errors import Message, SfcacheError, extraction_field
from sfcache.store import Reduction, decode, encode

__all__ = [
    "K_STEP",
    "SAMPLE_STEPS",
    "Moments",
    "check_fidelity",
    "cosine_by_k",
    "fit",
    "measure",
    "parse_reduce",
    "request",
    "sample_rows",
    "tail_warnings",
    "valid_tokens",
]

SAMPLE_STEPS = 256  # fit sample (steps spread evenly over the dataset); ~100k tokens on LIBERO's 2 views
HELD_OUT_EVERY = 4  # every 4th sample step is held out to measure fidelity
K_STEP = 8  # `pca:auto` tries K in multiples of 8: int8 then keeps >= 8 channels per scale
# `--min-cosine` bounds the held-out *mean*; a few tokens (an object the sample rarely shows, a view's border)
# can lie off the basis while the mean passes. A 1st percentile or worst this far below the mean is reported.
TAIL_GAP = {"p1": 0.05, "worst": 0.2}
REDUCE, MIN_COSINE = extraction_field("reduce"), extraction_field("min_cosine")  # the settings messages name
COSINE_CHUNK = 4096  # held-out tokens per chunk of the K scan (bounds its memory to ~64 MiB at C = 2048)


def parse_reduce(text: str) -> int | str | None:
    """`--reduce` value -> None (no reduction), K (pca:K) or "auto" (pca:auto)."""
    if text in (None, "none"):
        return None
    method, _, k = str(text).partition(":")
    if method == "pca" and k == "auto":
        return "auto"
    if method == "pca" and k.isdigit() and int(k) >= 1:
        return int(k)
    raise SfcacheError(Message(REDUCE, f" must be none, pca:K (K >= 1 components) or pca:auto, not {text!r}"))


def request(reduce: str, min_cosine: float | None, num_steps: int) -> dict:
    """What a reduced store was asked: part of its identity (a resume must ask the same)."""
    fit_rows, held_rows = sample_rows(num_steps)
    return {
        "method": "pca",
        "asked": reduce,
        "min_cosine": min_cosine,
        "sample_steps": int(fit_rows.size),
        "held_out_steps": int(held_rows.size),
    }


def sample_rows(num_steps: int, steps: int = SAMPLE_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): up to `steps` rows evenly spread over [0, num_steps), every
    HELD_OUT_EVERY-th held out (at least one of each)."""
    if num_steps < 2:
        raise SfcacheError(
            Message(REDUCE, f" needs at least 2 steps to fit and measure a basis, the selection has {num_steps}")
        )
    rows = np.unique(np.linspace(0, num_steps - 1, min(steps, num_steps)).round().astype(np.int64))
    held = rows[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY] if rows.size >= HELD_OUT_EVERY else rows[-1:]
    return np.setdiff1d(rows, held), held


def valid_tokens(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[T, V, n, C] (and bool [T, V, n]) -> [m, C]: the tokens holding image content."""
    return values[mask] if mask is not None else values.reshape(-1, values.shape[-1])


class Moments:
    """Running token count, sum and Gram matrix in float64: the mean and covariance of the fit sample."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels, np.float64)
        self.gram = np.zeros((channels, channels), np.float64)

    def add(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(np.float64)
        self.count += len(tokens)
        self.sum += tokens.sum(axis=0)
        self.gram += tokens.T @ tokens

    def principal(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [C], every component [C, C], rows by decreasing variance, sign fixed so the largest
        loading is positive): float32, so the same moments always give the same basis."""
        mean = self.sum / max(self.count, 1)
        covariance = self.gram / max(self.count, 1) - np.outer(mean, mean)
        _, vectors = np.linalg.eigh((covariance + covariance.T) / 2)
        components = vectors[:, ::-1].T
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        return mean.astype(np.float32), (components * np.where(signs == 0, 1.0, signs)[:, None]).astype(np.float32)


def cosine_by_k(tokens: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Mean per-token cosine of x and its float reconstruction mean + sum_{j<K} c_j v_j, for every
    K = 1..len(components).

    One pass: with orthonormal v_j, x.x_hat and |x_hat|^2 are cumulative sums over j.
    """
    total = np.zeros(len(components), np.float64)
    mean, components = mean.astype(np.float64), components.astype(np.float64)
    mean_along = components @ mean
    for first in range(0, len(tokens), COSINE_CHUNK):
        x = tokens[first : first + COSINE_CHUNK].astype(np.float64)
        along = x @ components.T  # x . v_j
        coeff = along - mean_along  # (x - mean) . v_j
        dot = (x @ mean)[:, None] + np.cumsum(coeff * along, axis=1)
        norm2 = mean @ mean + np.cumsum(coeff * (2 * mean_along + coeff), axis=1)
        scale = np.linalg.norm(x, axis=1)[:, None] * np.sqrt(np.maximum(norm2, 0))
        total += np.where(scale > 0, dot / np.maximum(scale, 1e-300), 0.0).sum(axis=0)
    return total / max(len(tokens), 1)


def measure(values: np.ndarray, mask: np.ndarray | None, mean: np.ndarray, components: np.ndarray, dtype: str) -> dict:
    """Held-out fidelity through the stored dtype: mean, 1st percentile and worst per-token cosine."""
    from sfcache.inspection import token_cosine  # inspection imports the store; only needed here

    coefficients = (values - mean) @ components.T
    stored, scale = encode(coefficients, dtype)
    back = decode(stored, dtype, scale) @ components + mean
    cosine = token_cosine(back, values)
    cosine = cosine[mask] if mask is not None else cosine.reshape(-1)
    return {
        "k": int(len(components)),
        "mean": float(cosine.mean()),
        "p1": float(np.percentile(cosine, 1)),
        "worst": float(cosine.min()),
    }


def fit(
    asked: dict, moments: dict[int, Moments], held: dict[int, tuple[np.ndarray, np.ndarray | None]], dtype: str
) -> Reduction:
    """A fitted Reduction per layer: K as asked, or for pca:auto the smallest multiple of K_STEP (or C)
    whose held-out mean cosine, measured through `dtype`, reaches `min_cosine`."""
    k_asked = parse_reduce(asked["asked"])
    means, bases, fidelity = {}, {}, {}
    for layer, layer_moments in moments.items():
        mean, components = layer_moments.principal()
        values, mask = held[layer]
        channels = len(components)
        if k_asked == "auto":
            curve = cosine_by_k(valid_tokens(values, mask), mean, components)
            candidates = sorted({*range(K_STEP, channels, K_STEP), channels})
            k = next((c for c in candidates if curve[c - 1] >= asked["min_cosine"]), channels)
            figures = measure(values, mask, mean, components[:k], dtype)
            while figures["mean"] < asked["min_cosine"] and k < channels:  # quantisation cost the last bit
                k = next(c for c in candidates if c > k)
                figures = measure(values, mask, mean, components[:k], dtype)
        else:
            if k_asked > channels:
                raise SfcacheError(
                    Message(
                        REDUCE, f" pca:{k_asked}: layer {layer} has only {channels} channels; choose K <= {channels}"
                    )
                )
            k = k_asked
            figures = measure(values, mask, mean, components[:k], dtype)
        means[layer], bases[layer], fidelity[str(layer)] = mean, components[:k].copy(), figures
    return Reduction(request=asked, means=means, components=bases, fidelity=fidelity)


def tail_warnings(reduction: Reduction) -> list[str]:
    """One line per layer whose held-out 1st-percentile or worst token cosine lies far below the mean
    (TAIL_GAP): the mean is what --min-cosine bounds, so such a store passes with badly rebuilt tokens."""
    lines = []
    for layer, figures in (reduction.fidelity or {}).items():
        far = [f"{name} {figures[name]:.3f}" for name, gap in TAIL_GAP.items() if figures[name] < figures["mean"] - gap]
        if far:
            lines.append(
                f"--reduce {reduction.request['asked']}: layer {layer} K={figures['k']} rebuilds held-out tokens "
                f"at mean cosine {figures['mean']:.3f} but {' and '.join(far)} (--min-cosine bounds only the mean); "
                "some tokens lose most of their target: use a larger pca:K, or no --reduce"
            )
    return lines


def check_fidelity(reduction: Reduction) -> None:
    """Refuse a reduction whose held-out mean cosine is below the asked --min-cosine, or a pca:auto that
    needs every channel (a store larger than no reduction at all), with one clear line; warn (the
    `sfcache` logger) when its worst tokens are far below the mean (`tail_warnings`)."""
    floor = reduction.request.get("min_cosine")
    for layer, components in reduction.components.items() if floor is not None else ():
        if reduction.request["asked"] == "pca:auto" and len(components) == components.shape[1]:
            raise SfcacheError(
                Message(
                    REDUCE,
                    f" pca:auto: layer {layer} reaches ",
                    MIN_COSINE,
                    f" {floor} only with all {components.shape[1]} channels, so nothing is saved; extract without ",
                    REDUCE,
                    ", or lower ",
                    MIN_COSINE,
                )
            )
    low = {layer: f for layer, f in (reduction.fidelity or {}).items() if floor is not None and f["mean"] < floor}
    if low:
        layer, figures = next(iter(low.items()))
        raise SfcacheError(
            Message(
                REDUCE,
                f" {reduction.request['asked']}: layer {layer} reconstructs held-out steps at mean per-token cosine "
                f"{figures['mean']:.5f} with K={figures['k']}, below ",
                MIN_COSINE,
                f" {floor}; refusing to write this store (use a larger K, pca:auto, or a lower ",
                MIN_COSINE,
                ", with ",
                extraction_field("overwrite"),
                " if the store exists)",
            )
        )
    for line in tail_warnings(reduction):
        logging.getLogger("sfcache").warning("warning: %s", line)
