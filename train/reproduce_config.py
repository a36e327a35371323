"""What `sf reproduce-libero` is asked for: its options, how it hands them to each stage's config, and the
checks of every input (data, weights, device, scheduler, depth data) made before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from sfcache.device import DEVICE_CHOICES, check_device, resolve_device
from sfcache.errors import Message, SfcacheError, SourceError, WeightsError, field_of
from sfcache.extract import ExtractConfig
from sfcache.libero_eval import EvalConfig
from sfcache.libero_sim import RESOLUTION
from sfcache.options import comma_list, comma_text, handed_on, option, option_like, same_fields, user_path
from sfcache.sources import detect_format
from sfcache.train.loop import TrainConfig
from sfcache.train.probe import ProbeConfig, depth_source
from sfcache.vggt.weights import HUB_ID, RANDOM_SPEC, weights_config

SUITES = ("spatial", "object", "goal", "10")
GET_DATA = (
    "get the RLDS release with `huggingface-cli download openvla/modified_libero_rlds --repo-type dataset "
    "--local-dir DIR` (folders libero_<suite>_no_noops/), or the HDF5 suites with LIBERO's "
    "benchmark_scripts/download_libero_datasets.py (folders libero_<suite>/), then pass --libero-dir DIR "
    "(LIBERO_DIR=DIR with make)"
)
GET_VGGT = (
    "get the official checkpoint facebook/VGGT-1B (CC BY-NC 4.0) with `huggingface-cli download "
    "facebook/VGGT-1B model.pt --local-dir DIR` and pass --vggt DIR/model.pt (VGGT=DIR/model.pt with make), or "
    "facebook/VGGT-1B once it is in your Hugging Face cache"
)


def _parse_suites(text: str) -> tuple[str, ...]:
    """'spatial, libero_object' -> ('spatial', 'object')."""
    return tuple(suite.removeprefix("libero_") for suite in comma_list(text) if suite)


@dataclass(frozen=True)
class ReproduceConfig:
    """Inputs of the reproduction; the defaults are for real runs on a GPU (each help is its option's).

    An option handed on to a stage takes its default, help and check from that stage's config (`option_like`).
    Making one checks nothing: `preflight` lists every problem (`problems()`, the data, weights, device and
    scheduler) in one message, so a user fixes them all in one go.
    """

    libero_dir: Path | None = option(
        None,
        "Folder holding libero_<suite>_no_noops/ (RLDS or HDF5) or libero_<suite>/ (HDF5) folders.",
        parse=user_path,
        show=str,
        required=True,
    )
    vggt: str | None = option(
        None,
        "VGGT checkpoint path, a cached hub id (facebook/VGGT-1B), or random:<preset> (pipeline tests only).",
        required=True,
    )
    out: Path = option(Path("out/reproduce-libero"), "Output folder (caches, runs, report).")
    device: str = option_like(ExtractConfig, "device")
    scheduler: str | None = option_like(ExtractConfig, "scheduler")
    suites: tuple[str, ...] = option(SUITES, "Comma list of suites to run.", parse=_parse_suites, show=comma_text)
    require_all: bool = option(False, "Stop if any asked suite is missing.")
    steps: int = option_like(TrainConfig, "steps")
    model_size: str = option_like(TrainConfig, "model_size")
    batch_size: int = option_like(TrainConfig, "batch_size")
    grid: int = option_like(
        TrainConfig, "grid", help="Target grid and policy tokens, NxN or N per side (16x16 -> 224 px images)."
    )
    dtype: str = option_like(ExtractConfig, "dtype")
    # the baseline runs are the alpha 0 ones: this alpha is the SF runs' only
    align_weight: float = option_like(TrainConfig, "align_weight", help="SF's alpha for the runs with SF.")
    # a report's validation L1 needs more held-out episodes than a quick `sf train`
    val_episodes: int = option_like(TrainConfig, "val_episodes", default=10, help="Held-out episodes per suite.")
    val_every: int = option_like(TrainConfig, "val_every", help="Validate and checkpoint every N steps.")
    loader_workers: int = option_like(TrainConfig, "loader_workers")
    extract_batch_size: int = option_like(ExtractConfig, "batch_size")
    steps_per_shard: int = option_like(ExtractConfig, "steps_per_shard")
    eval_trials: int = option_like(
        EvalConfig,
        "trials_per_task",
        help="LIBERO simulator episodes per task and checkpoint (OFT: 50); 0 skips the simulator evaluation.",
    )
    eval_checkpoints: int = option(
        1, "Checkpoints evaluated per run, evenly spaced, the last one included (>1 plots success vs steps)."
    )
    eval_max_steps: int | None = option_like(EvalConfig, "max_steps")
    probe_dir: Path | None = option(
        None,
        "Folder of LIBERO HDF5 suites with depth (libero_<suite>/ from `sf collect-libero --depth` or "
        "`sf render-depth`): probe both policies' tokens for depth (`sf probe`), side by side.",
        parse=user_path,
        show=str,
    )
    probe_steps: int = option_like(ProbeConfig, "steps", help="Training steps of each depth-probe head.")
    probe_every: int = option_like(ProbeConfig, "every")

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))

    def problems(self) -> list[str | Message]:
        """What is wrong with the options: this config's own checks, then those of each stage's config built
        from it (device and scheduler are `preflight`'s), each naming the option as `sf reproduce-libero` does."""
        named = partial(field_of, ReproduceConfig)
        problems = []
        unknown = [s for s in self.suites if s not in SUITES]
        if unknown or not self.suites:
            problems.append(Message(named("suites"), f" {','.join(self.suites)}: choose from {','.join(SUITES)}"))
        if self.align_weight <= 0:
            problems.append(
                Message(
                    named("align_weight"),
                    f" must be > 0 for the SF runs (the baseline uses 0), got {self.align_weight}",
                )
            )
        if self.eval_trials < 0 or self.eval_checkpoints < 1:
            problems.append(
                Message(
                    named("eval_trials"),
                    " must be >= 0 and ",
                    named("eval_checkpoints"),
                    f" >= 1, got {self.eval_trials} and {self.eval_checkpoints}",
                )
            )
        if self.val_episodes < 1:
            problems.append(
                Message(
                    named("val_episodes"),
                    f" must be >= 1 (validation L1 is the evaluation), got {self.val_episodes}",
                )
            )
        if self.out.is_file():
            problems.append(
                Message(named("out"), f" {self.out}: is a file; expected an output folder (new or to resume)")
            )
        if self.probe_dir is not None and not self.probe_dir.is_dir():
            problems.append(
                Message(named("probe_dir"), f" {self.probe_dir}: no such directory (LIBERO HDF5 suites with depth)")
            )
        # the stage configs check device and scheduler, and alpha and held-out episodes less strictly: those are
        # left out (valid values), so each problem is named once
        checked = replace(
            self, device="auto", scheduler=None, align_weight=1.0, val_episodes=1, out=self.out / "preflight"
        )
        suite = SuiteData(SUITES[0], Path("."), "libero_rlds")
        stages = [
            lambda: extraction_config(checked, suite, checked.out),
            # save_every is set from --val-every too: checked as val_every alone, so it is named once
            lambda: TrainConfig(
                **training_fields(checked, suite, checked.out, checked.out, checked.align_weight) | {"save_every": 1}
            ),
            lambda: probe_config(checked, checked.out, checked.out),
        ]
        if self.eval_trials > 0:
            stages.append(lambda: evaluation_config(checked, suite, checked.out))
        fields = handed_on(ReproduceConfig)
        for build in stages:
            try:
                build()
            except SfcacheError as problem:
                problems.append(problem.message.renamed(fields))
        return problems


@dataclass(frozen=True)
class SuiteData:
    """One LIBERO suite found on disk."""

    suite: str  # "spatial", "object", "goal", "10"
    path: Path  # the folder handed to open_source
    format: str  # libero_rlds | libero_hdf5

    @property
    def name(self) -> str:
        return f"libero_{self.suite}"


# ----------------------------------------------------------------------------- each stage's config


def extraction_config(cfg: ReproduceConfig, suite: SuiteData, store: Path) -> ExtractConfig:
    return ExtractConfig(
        source=suite.path,
        out=store,
        vggt=cfg.vggt,
        format=suite.format,
        layers=(-1,),  # SF: last
        grid=(cfg.grid, cfg.grid),
        dtype=cfg.dtype,
        batch_size=cfg.extract_batch_size,
        steps_per_shard=cfg.steps_per_shard,
        scheduler=cfg.scheduler,
        device=cfg.device,
    )


def training_config(cfg: ReproduceConfig, suite: SuiteData, store: Path, out: Path, align_weight: float) -> TrainConfig:
    return TrainConfig(**training_fields(cfg, suite, store, out, align_weight))


def training_fields(cfg: ReproduceConfig, suite: SuiteData, store: Path, out: Path, align_weight: float) -> dict:
    """The `TrainConfig` fields of one run of a suite."""
    return dict(
        source=suite.path,
        out=out,
        cache=store if align_weight > 0 else None,
        align_weight=align_weight,
        **same_fields(cfg, ("steps", "batch_size", "model_size", "grid", "device", "val_episodes")),
        val_every=cfg.val_every,
        save_every=cfg.val_every,
        loader_workers=cfg.loader_workers,
    )


def evaluation_config(cfg: ReproduceConfig, suite: SuiteData, out: Path, resolution: int = RESOLUTION) -> EvalConfig:
    """`resolution`: the render size, the checkpoint's training frame size when known (`render_size`)."""
    return EvalConfig(
        suite=suite.suite,
        out=out,
        trials_per_task=cfg.eval_trials,
        max_steps=cfg.eval_max_steps,
        resolution=resolution,
    )


def probe_config(cfg: ReproduceConfig, run: Path, data: Path) -> ProbeConfig:
    """`sf probe` of one run's checkpoint on the suite's depth data, into RUN/probe."""
    return ProbeConfig(
        checkpoint=run, data=data, out=run / "probe", steps=cfg.probe_steps, every=cfg.probe_every, device=cfg.device
    )


# ----------------------------------------------------------------------------- checks before any work


def find_suites(libero_dir: Path, suites: tuple[str, ...]) -> tuple[list[SuiteData], list[str]]:
    """Suites found under `libero_dir` (the `_no_noops` folder, RLDS or HDF5, before the original HDF5 one)
    and the names of those not found."""
    found, missing = [], []
    for suite in suites:
        for folder in (libero_dir / f"libero_{suite}_no_noops", libero_dir / f"libero_{suite}"):
            if not folder.is_dir():
                continue
            try:
                fmt = detect_format(folder)
            except SourceError:
                continue
            if fmt in ("libero_rlds", "libero_hdf5"):
                found.append(SuiteData(suite, folder, fmt))
                break
        else:
            missing.append(f"libero_{suite}")
    return found, missing


def _check_data(cfg: ReproduceConfig) -> tuple[list[SuiteData], list[str], list[str]]:
    """(suites found, suites missing, problems)."""
    if cfg.libero_dir is None:
        return [], [], [f"--libero-dir is not given (LIBERO_DIR= with make): {GET_DATA}"]
    root = cfg.libero_dir
    if not root.is_dir():
        return [], [], [f"--libero-dir {root}: no such directory; {GET_DATA}"]
    found, missing = find_suites(root, cfg.suites)
    looked = ", ".join(f"libero_{s}_no_noops/ or libero_{s}/" for s in cfg.suites)
    if not found:
        hint = ""
        if root.name.startswith("libero_"):
            hint = f" ({root.name} looks like one suite folder: pass its parent {root.parent} instead)"
        return (
            [],
            missing,
            [f"--libero-dir {root} holds none of the LIBERO suites{hint}; looked for {looked}. {GET_DATA}"],
        )
    if missing and cfg.require_all:
        return (
            found,
            missing,
            [
                f"--libero-dir {root}: found {', '.join(s.name for s in found)} but not "
                f"{', '.join(missing)} (--require-all); {GET_DATA}"
            ],
        )
    return found, missing, []


def _check_vggt(spec: str | None) -> list[str]:
    """Problems with the VGGT spec, found without loading or downloading the model."""
    if not spec:
        return [f"--vggt is not given (VGGT= with make): {GET_VGGT}"]
    if RANDOM_SPEC.match(spec):
        try:
            weights_config(spec)
        except WeightsError as error:
            return [str(error)]
        return []
    if Path(spec).expanduser().exists():
        try:
            weights_config(spec)
        except WeightsError as error:
            return [f"--vggt {spec}: {error}; {GET_VGGT}"]
        return []
    if HUB_ID.match(spec):
        return _check_hub_cache(spec)
    return [f"--vggt {spec}: no such file or directory, and not a hub id; {GET_VGGT}"]


def _check_hub_cache(repo_id: str) -> list[str]:
    """A hub id is used only from the local Hugging Face cache: nothing is downloaded behind the user's back."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return [f"--vggt {repo_id}: a hub id needs huggingface_hub (pip install 'sfcache[hub]'); or {GET_VGGT}"]
    for name in ("model.safetensors", "model.pt"):
        if isinstance(try_to_load_from_cache(repo_id, name), str):
            return []
    return [f"--vggt {repo_id}: not in the local Hugging Face cache, and this command downloads nothing; {GET_VGGT}"]


def _check_device(device: str) -> list[Message]:
    named = field_of(ReproduceConfig, "device")
    try:
        check_device(device, named)
    except SfcacheError:
        return [Message(named, f" {device}: expected {DEVICE_CHOICES}")]
    try:
        resolve_device(device, name=named)
    except SfcacheError as problem:
        return [Message(problem.message, " (", named, " auto picks a GPU when there is one)")]
    return []


def _check_scheduler(address: str | None) -> list[str]:
    if not address:
        return []
    from distributed import Client

    try:
        with Client(address, timeout="10s"):
            return []
    except (OSError, ValueError) as error:
        return [f"--scheduler {address}: cannot reach the Dask scheduler ({error}); leave it out for a local cluster"]


def probe_data(probe_dir: Path, suite: SuiteData) -> Path:
    """The suite's LIBERO HDF5 dataset with depth under --probe-dir, checked as `sf probe` checks it."""
    found, _ = find_suites(probe_dir, (suite.suite,))
    if not found or found[0].format != "libero_hdf5":
        raise SfcacheError(f"--probe-dir {probe_dir}: no LIBERO HDF5 {suite.name}/ (with depth) to probe")
    depth_source(found[0].path)
    return found[0].path


def _check_probe_data(cfg: ReproduceConfig, found: list[SuiteData]) -> list[str]:
    """A problem per suite to run whose depth data --probe-dir lacks (none without --probe-dir)."""
    if cfg.probe_dir is None or not cfg.probe_dir.is_dir():  # no probe, or the option's own problem
        return []
    problems = []
    for suite in found:
        try:
            probe_data(cfg.probe_dir, suite)
        except SfcacheError as problem:
            problems.append(str(problem))
    return problems


def preflight(cfg: ReproduceConfig) -> tuple[list[SuiteData], list[str]]:
    """(suites to run, suites missing); SfcacheError listing every problem with the inputs, before any work."""
    found, missing, data_problems = _check_data(cfg)
    problems = (
        cfg.problems()
        + data_problems
        + _check_probe_data(cfg, found)
        + _check_vggt(cfg.vggt)
        + _check_device(cfg.device)
        + _check_scheduler(cfg.scheduler)
    )
    if problems:
        raise SfcacheError(Message("nothing was run:\n  - ", Message.join("\n  - ", problems)))
    return found, missing
