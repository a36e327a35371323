"""What a store's features look like: a PNG of sampled steps, each view's input beside its targets in PCA colours."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sfcache.errors import StoreError
from sfcache.inspection.record import Record
from sfcache.inspection.store_access import extracted_rows, open_recorded_source, shown_layer
from sfcache.recipes import insert_blanks
from sfcache.store import Cache
from sfcache.vggt import random_weights_warning
from sfcache.vggt.preprocess import host_frames, letterbox_mask


@dataclass(frozen=True)
class PcaPicture(Record):
    path: str
    width: int
    height: int
    layer: int
    views: tuple[str, ...]
    steps: tuple[tuple[str, int], ...]


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """Tokens [..., C] -> uint8 colours [..., 3]: the first three principal components of all given tokens.

    Each component is clipped to its 1st-99th percentile and scaled to 0-255; its sign is fixed so that
    its largest loading is positive, so the same tokens always get the same colours.
    """
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    centered = flat - flat.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(centered.T @ centered)
    components = eigenvectors[:, ::-1][:, :3]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    projected = centered @ (components * np.where(signs == 0, 1.0, signs))
    if projected.shape[1] < 3:
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    scaled = (projected - low) / np.where(high > low, high - low, 1.0)
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8).reshape(*tokens.shape[:-1], 3)


LINE = 12  # pixels per line of text (PIL's default font)
CAPTION = (
    "PCA Ln: the targets of VGGT layer n in colour: their first 3 principal components (fit over every token "
    "shown) as red, green, blue, so alike colours are alike features. Hatched: masked tokens (no image there)."
)


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels: broken at spaces, a longer word (an episode key) anywhere."""
    font, lines = ImageFont.load_default(), [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if not lines[-1] or font.getlength(line) <= width - 4:
            lines[-1] = line
            continue
        lines.append(word)
    wrapped = []
    for line in lines:
        while font.getlength(line) > width - 4 and len(line) > 1:
            cut = max(n for n in range(1, len(line)) if n == 1 or font.getlength(line[:n]) <= width - 4)
            wrapped.append(line[:cut])
            line = line[cut:]
        wrapped.append(line)
    return wrapped


def _legend(width: int, tasks: Sequence[str]) -> list[str]:
    """The caption and the numbered tasks the rows are labelled with, wrapped to `width` pixels."""
    return _wrap(CAPTION, width) + [
        line for n, task in enumerate(tasks, 1) for line in _wrap(f"task {n}: {task}", width)
    ]


def label_band(width: int, tasks: Sequence[str] = ()) -> int:
    """Pixels above a `width` px picture's rows: column labels, the weights, the caption saying what it shows and
    the tasks of its rows (`tasks`: each row's episode key without its last part, in order of first use)."""
    return (2 + len(_legend(width, tasks))) * LINE + 4


def pca_picture_size(frame_size: tuple[int, int], views: int, steps: int, tasks: Sequence[str] = ()) -> tuple[int, int]:
    """(width, height) of a `pca_picture`: a label band, then per step a row of [frame | PCA] per view, at the
    size of the frame shown (what VGGT saw: openpi's 224 px letterbox for a --recipe openpi store)."""
    height, width = frame_size
    return 2 * views * width, label_band(2 * views * width, tasks) + steps * height


def vggt_frames(frames: np.ndarray, preprocess: str) -> np.ndarray:
    """uint8 [T, V, H, W, 3] slot frames -> the picture VGGT was given, where it differs from the frame: openpi's
    letterbox (padding white, as in the VGGT copy); other modes only resize, so the frame itself."""
    if preprocess != "letterbox":
        return frames
    shown = host_frames(frames, "letterbox")
    shown[:, :, ~letterbox_mask(*frames.shape[2:4], shown.shape[2])] = 255
    return shown


def _hatched(size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] grey diagonal stripes: what a masked token is drawn as."""
    rows, cols = np.indices(size)
    return np.where(((rows + cols) // 4 % 2 == 0)[..., None], 70, 150).astype(np.uint8).repeat(3, -1)


def _fit(text: str, width: int) -> str:
    """`text`, its start cut (the end of an episode key is what tells it apart) to fit `width` pixels."""
    font = ImageFont.load_default()
    while len(text) > 4 and font.getlength(text) > width - 4:
        text = "..." + text[4:]
    return text


def pca_picture(
    cache: Cache,
    out: str | Path,
    steps: int = 4,
    episode: str | None = None,
    layer: int | None = None,
    source_path: str | Path | None = None,
) -> PcaPicture:
    """Write a PNG of `steps` extracted steps: each view's input to VGGT beside a PCA-to-RGB picture of its targets.

    Steps are spread evenly over `episode` (or over all extracted rows); each row is labelled with its episode key
    (task included) and step. The PCA is fit over every unmasked token shown, so colours compare across steps and
    views; token grids are upsampled nearest to the frame size; masked tokens (an openpi store's padding and blank
    slots) are hatched, a wholly masked slot labelled so. The PNG is pca_picture_size((H, W), views, steps) pixels.
    """
    layer = shown_layer(cache, layer)
    rows = _picture_rows(cache, steps, episode)
    source = open_recorded_source(cache, source_path)
    locate = cache.index.locate
    preprocess = cache.provenance.vggt.preprocess
    frames = vggt_frames(
        insert_blanks(
            np.concatenate([source.read(key, step, step + 1).frames for key, step in map(locate, rows)]), cache.views
        ),
        preprocess,
    )  # [n, V, H, W, 3]
    if cache.has_mask:
        values, mask = cache.read_rows(rows, layer=layer, mask=True)
    else:
        values = cache.read_rows(rows, layer=layer)
        mask = np.ones(values.shape[:-1], bool)
    colours = np.zeros((*values.shape[:-1], 3), np.uint8)
    if mask.any():
        colours[mask] = pca_rgb(values[mask])
    count, views, height, width, _ = frames.shape
    colours, mask = colours.reshape(count, views, *cache.grid, 3), mask.reshape(count, views, *cache.grid)
    shown_rows = [(key.rpartition("/")[0], key.rpartition("/")[2], step) for key, step in map(locate, rows)]
    tasks = list(dict.fromkeys(task for task, _, _ in shown_rows))  # two tasks may each have a demo_0
    canvas = Image.new("RGB", pca_picture_size((height, width), views, count, tasks))
    band = label_band(canvas.width, tasks)
    draw = ImageDraw.Draw(canvas)
    shown = "VGGT input (letterbox)" if preprocess == "letterbox" else "frame"
    for v, view in enumerate(cache.views):
        draw.text((2 * v * width + 2, 1), _fit(f"{view}: {shown}", width), fill="white")
        draw.text(((2 * v + 1) * width + 2, 1), _fit(f"{view}: PCA L{layer}", width), fill="white")
    weights_id = cache.provenance.vggt.weights_id
    random_weights = random_weights_warning(weights_id) is not None
    draw.text(
        (2, 1 + LINE),
        _fit(f"VGGT weights {weights_id}" + (": RANDOM, no geometry" if random_weights else ""), canvas.width),
        fill="red" if random_weights else "white",
    )
    for n, line in enumerate(_legend(canvas.width, tasks)):
        draw.text((2, 1 + (2 + n) * LINE), line, fill=(200, 200, 200))
    hatch = _hatched((height, width))
    for i, (task, episode_name, step) in enumerate(shown_rows):
        top = band + i * height
        for v in range(views):
            tokens = np.asarray(Image.fromarray(colours[i, v]).resize((width, height), Image.Resampling.NEAREST))
            covered = np.asarray(Image.fromarray(mask[i, v]).resize((width, height), Image.Resampling.NEAREST))
            canvas.paste(Image.fromarray(frames[i, v]), (2 * v * width, top))
            canvas.paste(Image.fromarray(np.where(covered[..., None], tokens, hatch)), ((2 * v + 1) * width, top))
            if not mask[i, v].any():
                note = (2 * v + 1) * width + 2, top + height // 2 - LINE // 2
                draw.rectangle(draw.textbbox(note, "masked (no camera)"), fill="black")
                draw.text(note, "masked (no camera)", fill="white")
        label = _fit(f"task {tasks.index(task) + 1} {episode_name} step {step}", 2 * width)
        draw.rectangle(draw.textbbox((2, top + 2), label), fill="black")
        draw.text((2, top + 2), label, fill="white")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return PcaPicture(
        path=str(out),
        width=canvas.width,
        height=canvas.height,
        layer=layer,
        views=tuple(cache.views),
        steps=tuple(map(locate, rows)),
    )


def _picture_rows(cache: Cache, steps: int, episode: str | None) -> np.ndarray:
    """Up to `steps` extracted rows spread evenly over an episode or the whole store."""
    if steps < 1:
        raise StoreError(f"{cache.path}: asked for a picture of {steps} steps; give at least 1")
    if episode is not None:
        record = cache.episode(episode)
        if episode in cache.missing_episodes():
            raise StoreError(f"{cache.path}: episode {episode!r} is not fully extracted yet; nothing to draw")
        candidates = np.arange(record.start, record.start + record.length)
    else:
        candidates = extracted_rows(cache, "draw")
    picks = np.linspace(0, candidates.size - 1, min(steps, candidates.size)).round().astype(int)
    return candidates[np.unique(picks)]
