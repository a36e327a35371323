"""What `sf extract` is asked to do: `ExtractConfig`, whose fields are its options, all checked at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from distributed.comm.addressing import get_address_host_port, parse_address

from sfcache.device import DEVICE_CHOICES, check_device
from sfcache.errors import Field, Message, SfcacheError, field_of, raise_problems
from sfcache.options import comma_list, comma_text, int_list, option
from sfcache.recipes import get_recipe, resolve_preprocess
from sfcache.reduce import parse_reduce
from sfcache.store import CODECS, DTYPES

MAX_COUNT = 1 << 20  # --batch-size, --steps-per-shard: beyond this a typo, not a plan (a shard index of 16 MiB)
MAX_GRID_SIDE = 1024  # --grid: VGGT's own patch grid is 16-74 per side; pooling only resamples it
PREPROCESS_MODES = ("sf", "crop", "pad")  # --preprocess; letterbox comes with --recipe openpi
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


def _parse_grid(text: str) -> tuple[int, int] | None:
    if text == "native":
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError("expected HxW like 16x16, or native") from None
    return height, width


def show_grid(grid: tuple[int, int]) -> str:
    return "x".join(map(str, grid))


def _scheduler_problem(address: str) -> Message | None:
    """Why `address` cannot be a Dask scheduler's (a network one needs host:port), checked before connecting."""
    try:
        if parse_address(address)[0] != "inproc":  # in-process clusters (tests) have no port
            get_address_host_port(address)
    except ValueError as error:
        return Message(named("scheduler"), f" {address!r}: {error}; expected an address like tcp://host:8786")
    return None


def named(name: str) -> Field:
    """`ExtractConfig`'s field `name`, as a message names it (`sf extract` shows its flag)."""
    return field_of(ExtractConfig, name)


@dataclass(frozen=True)
class ExtractConfig:
    """What `sf extract` was asked to do (each field's help is its `sf extract` option's)."""

    source: Path = option(
        help="Dataset folder or file (LIBERO HDF5/RLDS, LeRobot, RoboTwin).", argument=True, metavar="PATH"
    )
    out: Path = option(help="Target store directory (created, or resumed if it exists).")
    vggt: str | None = option(
        None,
        "VGGT weights: checkpoint path, hub id (facebook/VGGT-1B) or random:<preset> (random:<preset>@<seed>) for "
        "tests; needed to extract (--dry-run without it sizes the store for VGGT-1B).",
    )
    format: str = option("auto", "Source format, or auto to detect it.")
    views: tuple[str, ...] | None = option(  # None = the format's default views and order
        None,
        "Comma list of views in VGGT order, each a name or name=column (default: the format's); "
        "with --recipe openpi, 'blank' marks an empty camera slot.",
        parse=comma_list,
        show=comma_text,
    )
    layers: tuple[int, ...] = option(
        (-1,),
        "Comma list of VGGT layers; -1 is the last (23 on VGGT-1B, the one SF uses).",
        parse=int_list,
        show=comma_text,
    )
    grid: tuple[int, int] | None = option(
        (16, 16), "Target grid per view: HxW, or native (VGGT's patch grid).", parse=_parse_grid, show=show_grid
    )
    recipe: str = option(
        "none",
        "Feed VGGT exactly what a public SF trainer does: openvla-oft (TF JPEG decode, "
        "lanczos 224, primary+wrist) or openpi (letterbox 224, 3 camera slots, token mask); "
        "none: the source's decode and --preprocess.",
    )
    preprocess: str | None = option(
        None, "sf (OpenVLA's 224 px resize; the default), crop or pad (official VGGT); a --recipe fixes it."
    )
    compute_dtype: str = option(
        "auto",
        "VGGT autocast: auto (bfloat16 on Ampere+ GPUs, float32 on CPU), bfloat16 "
        "(as SF on GPU, also on CPU) or float32.",
    )
    dtype: str = option("float16", "Stored dtype: float16, bfloat16 or int8.")
    codec: str = option("none", "Compression: none, zstd or blosc-zstd.")
    checksum: bool = option(
        False,
        "CRC32C per stored step: inspect-cache --check then detects any flipped byte.",
        flag="--checksum/--no-checksum",
    )
    batch_size: int = option(8, "Steps per VGGT forward pass (each step is V frames).")
    steps_per_shard: int = option(32, "Steps per shard file (unit of resume).")
    workers: int | None = option(None, "Worker processes (default: one per GPU, else 1).")
    scheduler: str | None = option(None, "Address of a running Dask scheduler (tcp://...).")
    episodes: str | None = option(None, "Only episodes whose key matches this fnmatch pattern.")
    device: str = option("auto", f"{DEVICE_CHOICES}.")
    skip_bad: bool = option(False, "Leave unreadable episodes out and list them at the end.")
    overwrite: bool = option(False, "Replace a store made with another configuration.")
    reduce: str = option(
        "none",
        "Compact store: pca:K stores K PCA coefficients per token (basis fitted on a "
        "sample of steps, targets rebuilt on read); pca:auto picks the smallest K reaching "
        "--min-cosine; none stores full targets.",
    )
    min_cosine: float | None = option(
        None,
        "Held-out *mean* per-token cosine a --reduce store must reach, else extract refuses to write it (needed by "
        "pca:auto); the 1st-percentile and worst token cosines are recorded too, and warned on when far below.",
    )
    repair: bool = option(
        False,
        "Also read back every done shard and redo those that fail (what `sf inspect-cache "
        "--check` reports); missing shard files are always redone.",
    )

    def __post_init__(self):
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "out", Path(self.out))
        problems = []
        try:
            object.__setattr__(
                self, "preprocess", resolve_preprocess(get_recipe(self.recipe), self.preprocess, PREPROCESS_MODES)
            )
        except SfcacheError as error:
            problems.append(error.message)
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(
                Message(
                    named("compute_dtype"), f" must be one of {', '.join(COMPUTE_DTYPES)}, not {self.compute_dtype!r}"
                )
            )
        if self.dtype not in DTYPES:
            problems.append(Message(named("dtype"), f" must be one of {', '.join(DTYPES)}, not {self.dtype!r}"))
        if self.codec not in CODECS:
            problems.append(Message(named("codec"), f" must be one of {', '.join(CODECS)}, not {self.codec!r}"))
        try:
            check_device(self.device, named("device"))
        except SfcacheError as problem:
            problems.append(problem.message)
        for name in ("batch_size", "steps_per_shard"):
            value = getattr(self, name)
            if value < 1:
                problems.append(Message(named(name), f" must be >= 1, got {value}"))
            elif value > MAX_COUNT:
                problems.append(Message(named(name), f" must be <= {MAX_COUNT}, got {value}"))
        if self.workers is not None and self.workers < 1:
            problems.append(Message(named("workers"), f" must be >= 1, got {self.workers}"))
        if not self.layers or len(set(self.layers)) != len(self.layers):
            problems.append(Message(named("layers"), f" must be distinct layer indices, got {list(self.layers)}"))
        if self.grid is not None and not (min(self.grid) >= 1 and max(self.grid) <= MAX_GRID_SIDE):
            problems.append(
                Message(
                    named("grid"),
                    f" {show_grid(self.grid)}: each side must be in [1, {MAX_GRID_SIDE}] (VGGT-1B's own grid is "
                    "37x37; SF pools it to 16x16)",
                )
            )
        if self.scheduler is not None and (problem := _scheduler_problem(self.scheduler)):
            problems.append(problem)
        if self.out.is_file():
            problems.append(
                Message(named("out"), f" {self.out}: is a file; expected a store directory (new or to resume)")
            )
        try:
            reduce = parse_reduce(self.reduce)
            if reduce == "auto" and self.min_cosine is None:
                problems.append(
                    Message(
                        named("reduce"),
                        " pca:auto needs ",
                        named("min_cosine"),
                        " C (the held-out mean cosine to reach, e.g. 0.98)",
                    )
                )
            if reduce is None and self.min_cosine is not None:
                problems.append(
                    Message(named("min_cosine"), " applies only with ", named("reduce"), " pca:K or pca:auto")
                )
        except SfcacheError as error:
            problems.append(error.message)
        if self.min_cosine is not None and not 0 < self.min_cosine <= 1:
            problems.append(Message(named("min_cosine"), f" must be in (0, 1], got {self.min_cosine}"))
        raise_problems(problems)
