"""The store's arrays: each one's name, shape, chunks, shards, codecs (ARCHITECTURE.md "Store layout")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from sfcache.errors import StoreError
from sfcache.store.encoding import STORED_DTYPE, int8_block

if TYPE_CHECKING:
    from sfcache.provenance import Provenance
    from sfcache.store.config import Reduction, StoreConfig

# 2: int8 scales per token and channel block, recipe and optional token mask. 1 (int8 scales per
# step/view/channel) stays readable; resuming a version-1 store asks for --overwrite.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MASK_ARRAY = "targets/mask"
DONE_ARRAY = "done"
DIGESTS_ARRAY = "digests"  # [num_shards, files per shard, 2] uint64: (size, CRC32C) of each shard file; 0 = none
NO_FILE = 2**64 - 1  # the size recorded for a shard file that zarr left out (all fill value)
LAYER_PARTS = ("", "_scale", "_mean", "_basis")  # values, int8 scales, --reduce mean and basis
CODECS = ("none", "zstd", "blosc-zstd")
ERROR_LOG = ".sfcache.errors.log"  # tracebacks of unexpected extraction failures (the error line names it)


def layer_array(layer: int, part: str = "") -> str:
    """The array of a stored layer: its values (""), int8 "_scale", or a reduced store's "_mean" / "_basis"."""
    if part not in LAYER_PARTS:
        raise StoreError(f"unknown part {part!r} of a layer's arrays; expected one of {LAYER_PARTS}")
    return f"targets/layer_{layer}{part}"


def compressors(codec: str, itemsize: int, checksum: bool) -> tuple:
    """Inner-chunk bytes codecs for `--codec` (byte shuffle helps 16-bit floats a little), then an optional
    CRC32C per chunk so that any flipped byte makes the read fail instead of returning wrong targets."""
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    compress = {
        "none": (),
        "zstd": (ZstdCodec(level=3),),
        "blosc-zstd": (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize),),
    }[codec]
    return compress + ((Crc32cCodec(),) if checksum else ())


def step_bytes(views: int, tokens: int, channels: int, dtype: str, layers: int, token_mask: bool) -> int:
    """Uncompressed bytes of one stored step (a version-2 store): all layers, int8 scales, mask; dtype "float32":
    the targets a `--reduce` worker holds before projecting them."""
    per_layer = views * tokens * channels * {"int8": 1, "float32": 4}.get(dtype, 2)
    if dtype == "int8":
        per_layer += views * tokens * (channels // int8_block(channels)) * 4
    return per_layer * layers + (views * tokens if token_mask else 0)


def reduced_step_bytes(
    components: Mapping[int, np.ndarray], views: int, tokens: int, dtype: str, token_mask: bool
) -> int:
    """Uncompressed bytes of one stored step of a reduced store (K coefficients per layer, scales, mask)."""
    per_layer = sum(step_bytes(views, tokens, len(c), dtype, 1, False) for c in components.values())
    return per_layer + (views * tokens if token_mask else 0)


def expected_arrays(provenance: Provenance) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every array a store of `provenance` holds besides `done` and `digests`, with its shape and stored dtype: per
    layer its values (int8: and scales; a reduced store: and mean [C], basis [K, C]), then the token mask."""
    targets, rows = provenance.targets, provenance.num_steps
    views, tokens = len(targets.views), targets.grid[0] * targets.grid[1]
    arrays = {}
    for layer in targets.layers:
        width = int(targets.reduce.k[layer]) if targets.reduce else targets.channels
        arrays[layer_array(layer)] = ((rows, views, tokens, width), np.dtype(STORED_DTYPE[targets.dtype]))
        if targets.dtype == "int8":  # version 1: one scale per step, view and channel
            scale = (views, width) if provenance.format_version == 1 else (views, tokens, width // int8_block(width))
            arrays[layer_array(layer, "_scale")] = ((rows, *scale), np.dtype(np.float32))
        if targets.reduce:
            arrays[layer_array(layer, "_mean")] = ((targets.channels,), np.dtype(np.float32))
            arrays[layer_array(layer, "_basis")] = ((width, targets.channels), np.dtype(np.float32))
    if targets.has_mask:
        arrays[MASK_ARRAY] = ((rows, views, tokens), np.dtype(np.uint8))
    return arrays


def create_arrays(root: zarr.Group, config: StoreConfig) -> None:
    """Every array of a new store of `config`, empty (fill value 0), its PCA bases written."""
    root.create_group("targets")
    n, views, tokens = config.num_steps, len(config.views), config.grid[0] * config.grid[1]
    for layer in config.layers:
        width = config.stored_channels(layer)
        if config.reduce:
            _write_basis(root, layer, config.reduce)
        root.create_array(
            layer_array(layer),
            shape=(n, views, tokens, width),
            dtype=STORED_DTYPE[config.dtype],
            chunks=(1, views, tokens, width),
            shards=(config.steps_per_shard, views, tokens, width),
            compressors=compressors(config.codec, np.dtype(STORED_DTYPE[config.dtype]).itemsize, config.checksum),
            fill_value=0,
            attributes={
                "layer": layer,
                "encoding": config.dtype,
                **({"bits_of": "bfloat16"} if config.dtype == "bfloat16" else {}),
            },
        )
        if config.dtype == "int8":
            blocks = width // int8_block(width)
            root.create_array(
                layer_array(layer, "_scale"),
                shape=(n, views, tokens, blocks),
                dtype="float32",
                chunks=(1, views, tokens, blocks),
                shards=(config.steps_per_shard, views, tokens, blocks),
                compressors=compressors("none", 4, config.checksum),
                fill_value=0,
                attributes={
                    "layer": layer,
                    "scale_of": layer_array(layer).removeprefix("targets/"),
                    "block": int8_block(width),
                },
            )
    if config.token_mask:
        root.create_array(
            MASK_ARRAY,
            shape=(n, views, tokens),
            dtype="uint8",
            chunks=(1, views, tokens),
            shards=(config.steps_per_shard, views, tokens),
            compressors=compressors(config.codec, 1, config.checksum),
            fill_value=0,
            attributes={"mask_of": "every layer", "meaning": "1 = token holds image content"},
        )
    root.create_array(
        DONE_ARRAY, shape=(max(config.num_shards, 1),), chunks=(1,), dtype="uint8", fill_value=0, compressors=None
    )
    create_digests(root, config.num_shards, per_shard_arrays(config.layers, config.dtype, config.token_mask))


def create_digests(root: zarr.Group, num_shards: int, arrays: Mapping[int | str, list[str]]) -> None:
    """The digests array: per shard and shard file (in `Cache.shard_arrays` order) its [size, CRC32C]; one chunk
    per shard like `done`, so that recording one shard rewrites no other shard's."""
    files = [name for names in arrays.values() for name in names]
    root.create_array(
        DIGESTS_ARRAY,
        shape=(max(num_shards, 1), len(files), 2),
        chunks=(1, len(files), 2),
        dtype="uint64",
        fill_value=0,
        compressors=None,
        attributes={
            "files": files,
            "meaning": "[size in bytes, CRC32C] of each shard file as written (0, 0: not recorded; "
            f"size {NO_FILE}: no file, all fill value)",
        },
    )


def per_shard_arrays(layers: Sequence[int], dtype: str, has_mask: bool) -> dict[int | str, list[str]]:
    """{layer: its arrays stored shard by shard (values, int8 scales), MASK_ARRAY: [MASK_ARRAY] if stored}."""
    arrays: dict[int | str, list[str]] = {
        layer: [layer_array(layer)] + ([layer_array(layer, "_scale")] if dtype == "int8" else []) for layer in layers
    }
    return {**arrays, MASK_ARRAY: [MASK_ARRAY]} if has_mask else arrays


def _write_basis(root: zarr.Group, layer: int, reduce: Reduction) -> None:
    """A layer's PCA mean [C] and components [K, C] as float32 arrays of one chunk each."""
    for name, values in (
        (layer_array(layer, "_mean"), reduce.means[layer]),
        (layer_array(layer, "_basis"), reduce.components[layer]),
    ):
        array = root.create_array(
            name,
            shape=values.shape,
            dtype="float32",
            chunks=values.shape,
            fill_value=0,
            compressors=None,
            attributes={"layer": layer, "basis_of": layer_array(layer).removeprefix("targets/")},
        )
        array[...] = values
