"""Every option of every `sf` command, given a bad value, ends in exit 2 with one error naming it (or quoting the
value as typed: the readers' own messages name the file, format or layer), no traceback.

The options are enumerated from the click commands, so a new option is walked too: it gets the bad value of its
type (a negative number, a missing path, an unknown word) unless the table below gives it one or exempts it.
The other arguments are valid (small fixture data, random:tiny VGGT), so the bad value is the only problem;
no command gets as far as extracting, training or evaluating (each is replaced by a failing stand-in).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.core import TyperArgument, TyperOption

from sfcache.cli.main import app, main
from sfcache.cli.options import flag_of, option_fields
from sfcache.extract import ExtractConfig
from sfcache.libero_collect import CollectConfig
from sfcache.libero_eval import EvalConfig
from sfcache.libero_render_depth import RenderDepthConfig
from sfcache.options import OPTION
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.train.loop import TrainConfig, Trainer
from sfcache.train.probe import ProbeConfig
from sfcache.train.reproduce import ReproduceConfig
from tests._cli_helpers import run_main
from tests._train_helpers import GRID, write_dataset, write_store

COMMANDS = typer.main.get_command(app).commands  # typer 0.29 carries its own click: typer.core classes
CONFIGS = {
    "extract": ExtractConfig,
    "train": TrainConfig,
    "reproduce-libero": ReproduceConfig,
    "eval-libero": EvalConfig,
    "probe": ProbeConfig,
    "collect-libero": CollectConfig,
    "render-depth": RenderDepthConfig,
}

MISSING = "{tmp}/no-such-path"
A_FILE = "{file}"  # an existing file where a folder is expected
EXEMPT = "exempt"
# (command, option) -> bad value and the options that make the command use it, or (EXEMPT, why)
BAD: dict[tuple[str, str], tuple[str, ...]] = {
    ("extract", "--out"): (A_FILE,),
    ("extract", "--workers"): ("0",),
    ("extract", "--layers"): ("1,x",),
    ("extract", "--grid"): ("16by16",),
    ("extract", "--vggt"): ("random:huge",),
    ("extract", "--min-cosine"): ("1.5", "--reduce", "pca:auto"),
    ("extract", "--scheduler"): ("nowhere",),
    ("extract", "--reduce"): ("pca:x",),
    ("inspect-cache", "--episode"): ("nope",),
    ("inspect-cache", "--verify"): ("-1",),
    ("inspect-cache", "--seed"): (EXEMPT, "every integer is a seed"),
    ("inspect-cache", "--threshold"): ("1.5",),
    ("inspect-cache", "--vggt"): ("random:huge", "--verify", "1"),
    ("inspect-cache", "--device"): ("tpu", "--verify", "1"),
    ("inspect-cache", "--source"): (MISSING, "--verify", "1"),
    ("inspect-cache", "--pca"): ("{tmp}",),
    ("inspect-cache", "--pca-steps"): ("-1", "--pca", "{tmp}/pca.png"),
    ("inspect-cache", "--layer"): ("99", "--episode", "{episode}"),
    ("train", "--out"): (A_FILE,),
    ("train", "--cache"): (MISSING,),
    ("train", "--lr"): ("nan",),
    ("train", "--align-layer"): ("99",),
    ("train", "--cache-layer"): ("99",),
    ("train", "--online-vggt"): ("random:huge",),
    ("train", "--seed"): (EXEMPT, "every integer is a seed"),
    ("eval-libero", "--out"): (A_FILE,),
    ("eval-libero", "--tasks"): ("0-x",),
    ("eval-libero", "--seed"): (EXEMPT, "every integer is a seed"),
    ("reproduce-libero", "--out"): (A_FILE,),
    ("reproduce-libero", "--suites"): ("spatial,90",),
    ("reproduce-libero", "--vggt"): (MISSING,),
    ("reproduce-libero", "--scheduler"): ("nowhere",),
    ("reproduce-libero", "--eval-checkpoints"): ("0",),
    ("probe", "--out"): (A_FILE,),
    ("probe", "--layers"): ("1,x",),
    ("probe", "--seed"): (EXEMPT, "every integer is a seed"),
    ("collect-libero", "--out"): (A_FILE,),
    ("collect-libero", "--tasks"): ("0,x",),
    ("collect-libero", "--seed"): (EXEMPT, "every integer is a seed"),
    ("render-depth", "--out"): (A_FILE,),
}
BY_TYPE = {int: "-1", float: "-1", str: "nope", Path: MISSING}


def _name(param: TyperOption | TyperArgument) -> str:
    return param.opts[0] if isinstance(param, TyperOption) else param.name


def _bad(command: str, param: TyperOption | TyperArgument) -> tuple[str, ...]:
    """The bad value (and helper options) for `param`; EXEMPT first for one that cannot take a bad value."""
    if isinstance(param, TyperOption) and param.is_flag:
        return EXEMPT, "a flag takes no value"
    if (command, _name(param)) in BAD:
        return BAD[command, _name(param)]
    return (BY_TYPE[param.type_descriptor.annotation],)


WALK = [
    (command, param) for command, cmd in COMMANDS.items() for param in cmd.params if _bad(command, param)[0] != EXEMPT
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_options")
    data = write_dataset(root / "data", demos=2, steps=6)
    store = write_store(root / "store", data)
    libero = root / "libero"
    write_libero_hdf5(libero, suite="libero_goal", tasks=1, demos=2, steps=6, size=64)
    depth = write_libero_hdf5(root / "depth", tasks=1, demos=2, steps=4, size=32, depth=True).path
    from sfcache.train.loop import train

    train(
        TrainConfig(
            source=data,
            out=root / "run",
            steps=1,
            batch_size=2,
            align_weight=0,
            model_size="tiny",
            grid=GRID,
            device="cpu",
            val_episodes=0,
            loader_workers=0,
        )
    )
    (root / "a-file").write_text("not a folder")
    from sfcache.store import open_cache

    return {
        "data": str(data),
        "store": str(store),
        "libero": str(libero),
        "depth": str(depth),
        "run": str(root / "run"),
        "file": str(root / "a-file"),
        "episode": open_cache(store).episodes[0],
    }


def _valid(command: str, fx: dict[str, str], tmp: Path) -> tuple[list[str], dict[str, str]]:
    """(arguments, options) of a command that would run as given."""
    tiny = {"--model-size": "tiny", "--grid": str(GRID), "--device": "cpu"}
    return {
        "extract": ([fx["data"]], {"--out": str(tmp / "store"), "--vggt": "random:tiny", "--dry-run": None}),
        "inspect-source": ([fx["data"]], {}),
        "inspect-cache": ([fx["store"]], {}),
        "train": (
            [],
            {
                "--source": fx["data"],
                "--out": str(tmp / "run"),
                "--cache": fx["store"],
                "--steps": "1",
                "--warmup-steps": "1",
                "--loader-workers": "0",
                **tiny,
            },
        ),
        "eval-libero": ([fx["run"]], {"--suite": "spatial", "--device": "cpu"}),
        "probe": ([fx["run"]], {"--data": fx["depth"], "--out": str(tmp / "probe"), "--device": "cpu"}),
        "collect-libero": ([], {"--suite": "spatial", "--out": str(tmp / "collected")}),
        "render-depth": ([fx["data"]], {"--out": str(tmp / "with-depth")}),
        "reproduce-libero": (
            [],
            {"--libero-dir": fx["libero"], "--vggt": "random:tiny", "--out": str(tmp / "repro"), **tiny},
        ),
    }[command]


@pytest.fixture
def no_work(monkeypatch):
    """Any command that gets past its checks fails the test instead of doing the work."""

    def started(*args, **kwargs):
        raise AssertionError("the bad value was not caught before the work started")

    for target in (
        "sfcache.cli.extract.run_extract",
        "sfcache.cli.eval_libero.evaluate",
        "sfcache.train.reproduce.extract",
        "sfcache.train.reproduce.train_keeping_snapshots",
        "sfcache.train.probe.write_token_store",
        "sfcache.train.probe.probe",
        "sfcache.cli.collect_libero.collect",
        "sfcache.cli.render_depth.render_depth",
    ):
        monkeypatch.setattr(target, started)
    monkeypatch.setattr(Trainer, "run", started)


@pytest.mark.parametrize("command, param", WALK, ids=[f"{c} {_name(p)}" for c, p in WALK])
def test_a_bad_value_of_any_option_is_exit_2_with_one_error_naming_it(
    command, param, fixtures, tmp_path, capsys, no_work
):
    value, *helpers = (text.format(tmp=tmp_path, **fixtures) for text in _bad(command, param))
    arguments, options = _valid(command, fixtures, tmp_path)
    if isinstance(param, TyperArgument):
        arguments = [value]
        named = value
    else:
        options = {**options, param.opts[0]: value}
        named = param.opts[0]
    options.update(zip(helpers[::2], helpers[1::2]))
    args = [*arguments, *(item for flag, given in options.items() for item in (flag, given) if item is not None)]
    code, output = run_main(main, capsys, command, *args)
    assert code == 2, output
    assert "Traceback" not in output
    if "Usage:" in output:  # click refused the text itself (e.g. not a number)
        assert f"'{named}'" in output, output
        return
    lines = output.strip().splitlines()
    listing = lines[0].endswith("nothing was run:") and all(line.startswith("  - ") for line in lines[1:])
    assert lines[0].startswith("error: ") and (len(lines) == 1 or listing), output
    assert named in output or value in output, output  # the option, or the value as typed


def test_every_option_has_help_and_no_new_option_is_left_out_of_the_walk():
    walked = {(c, _name(p)) for c, p in WALK}
    for command, cmd in COMMANDS.items():
        for param in cmd.params:
            assert (getattr(param, "help", None) or "").strip(), f"sf {command} {_name(param)} has no help"
            assert (command, _name(param)) in walked or _bad(command, param)[0] == EXEMPT
    assert {key for key in BAD if BAD[key][0] != EXEMPT} <= walked  # no stale row in the table


@pytest.mark.parametrize("command", CONFIGS)
def test_cli_defaults_are_the_config_defaults(command):
    """Each option of a config field shows (and, typed back, gives) the field's own default."""
    params = {p.name: p for p in COMMANDS[command].params}
    for field in option_fields(CONFIGS[command]):
        param, info = params[field.name], field.metadata[OPTION]
        assert flag_of(field) in param.opts or param.name == field.name
        assert param.help == info.help
        if field.default is dataclasses.MISSING or info.required:
            assert param.required or (command == "eval-libero" and field.name == "out")
        elif info.parse is not None and param.default is not None:
            assert info.parse(param.default) == field.default
        else:
            assert param.default == field.default or (
                isinstance(field.default, Path) and Path(param.default) == field.default
            )


class _Parsed(Exception):
    """Raised by the stand-in of field_values: the command stops once its field values are known."""


@pytest.mark.parametrize("command", [c for c in CONFIGS if c != "render-depth"])  # its two are both required
def test_an_empty_text_is_the_config_default_for_every_text_and_path_option(command, monkeypatch):
    """What `make VAR=` passes: "" means the default (not Path('.'), the current folder, as typer would read it)."""
    from sfcache.cli import options as cli_options

    real, seen = cli_options.field_values, {}

    def parsed(config, given, defaults=None):
        seen.update(chosen=real(config, given, defaults), defaults=defaults or {})
        raise _Parsed

    monkeypatch.setattr(cli_options, "field_values", parsed)
    cmd, fields = COMMANDS[command], {f.name: f for f in option_fields(CONFIGS[command])}
    args, emptied = [], []
    for param in cmd.params:
        field = fields.get(param.name)
        if isinstance(param, TyperArgument):
            args.insert(0, "x")
        elif param.required:
            args += [param.opts[0], "x"]
        elif field is not None and param.type_descriptor.annotation is str:
            args += [param.opts[0], ""]
            emptied.append(field)
    assert emptied
    with pytest.raises(_Parsed):
        cmd.main(args, standalone_mode=False)
    for field in emptied:
        expected = seen["defaults"].get(field.name, field.default)
        assert seen["chosen"].get(field.name, field.default) == expected, (command, field.name)
        assert seen["chosen"].get(field.name, field.default) != Path(".")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_without_a_value_and_arguments_in_capitals(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, output = run_main(main, capsys, command, "--help")
    assert code == 0
    placeholders = [line for line in output.splitlines() if "<bool>" in line]
    assert [line.split()[1] for line in placeholders] == ["--help"], placeholders  # typer's own help option
    usage = next(line for line in output.splitlines() if "Usage:" in line)
    arguments = [p.metavar or p.name for p in COMMANDS[command].params if isinstance(p, TyperArgument)]
    for name in arguments:
        assert "{" + name.upper() + "}" in usage, usage
    fields = {f.name for f in option_fields(CONFIGS[command])} if command in CONFIGS else set()
    for param in COMMANDS[command].params:
        if isinstance(param, TyperOption) and param.is_flag and param.name in fields:
            assert param.secondary_opts == ["--no-" + param.opts[0][2:]], param.opts  # --x / --no-x, never --x true


def test_config_flags_come_in_pairs_and_take_no_value(fixtures, tmp_path, capsys):
    dry = ["extract", fixtures["data"], "--out", tmp_path / "s", "--vggt", "random:tiny", "--dry-run"]
    code, output = run_main(main, capsys, *dry, "--skip-bad", "--no-overwrite", "--no-checksum")
    assert code == 0 and "steps" in output, output
    code, output = run_main(main, capsys, *dry, "--skip-bad", "true")
    assert code == 2 and "Got unexpected extra argument" in output


# Each expected error of a command, given everything else valid, names the flag or the action that fixes it:
# (what is wrong, the command line, what its one error line must say)
FIXES = [
    (
        "train holds out more episodes than the dataset has",
        ["train", "--source", "{data}", "--out", "{tmp}/run", "--align-weight", "0", "--val-episodes", "4"],
        "4 episodes, cannot hold out 4 for validation; use --val-episodes 3 or fewer (0: no validation)",
    ),
    (
        "train resumes a run trained with another model size",
        ["train", "--source", "{data}", "--out", "{run}", "--align-weight", "0", "--val-episodes", "0"],
        "the checkpoint in {run} was trained with --model-size tiny, you asked small; use --no-resume (or another "
        "--out) to start over",
    ),
    (
        "train with a cache extracted at another grid",
        ["train", "--source", "{data}", "--cache", "{store}", "--out", "{tmp}/run", "--grid", "8x8"],
        "grid: store has [4, 4], asked [8, 8]); give the store's --views and --grid and the dataset it was "
        "extracted from as --source, or extract a store for these with sf extract",
    ),
    (
        "train with steps that are not a square grid",
        ["train", "--source", "{data}", "--out", "{tmp}/run", "--grid", "4x8"],
        "--grid 4x8: expected N or NxN",
    ),
    ("extract without weights", ["extract", "{data}", "--out", "{tmp}/store"], "--vggt is needed to extract"),
    ("inspect-cache of a folder without a store", ["inspect-cache", "{tmp}"], "run `sf extract` first"),
    (
        "eval-libero of a folder without a run",
        ["eval-libero", "{tmp}", "--suite", "spatial", "--device", "cpu"],
        "no checkpoint here (expected an `sf train` run folder or its checkpoint.pt)",
    ),
    (
        "probe of a folder without a run",
        ["probe", "{tmp}", "--data", "{depth}", "--out", "{tmp}/probe", "--device", "cpu"],
        "no checkpoint here (expected an `sf train` run folder or its checkpoint.pt)",
    ),
    ("inspect-source of a folder without a dataset", ["inspect-source", "{tmp}"], "or --format one of"),
    (
        "reproduce-libero with its required options empty (make's unset variables)",
        ["reproduce-libero", "--libero-dir", "", "--vggt", ""],
        "--libero-dir",
    ),
]


@pytest.mark.parametrize("args, fix", [case[1:] for case in FIXES], ids=[case[0] for case in FIXES])
def test_each_expected_error_names_its_fix(args, fix, fixtures, tmp_path, capsys, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the command got past the check that should have refused it")

    monkeypatch.setattr(Trainer, "run", started)
    monkeypatch.setattr("sfcache.train.reproduce.extract", started)
    tiny = ["--device", "cpu", "--steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--loader-workers", "0"]
    if args[0] == "train":
        args = [*args, *tiny, *([] if "--grid" in args else ["--grid", str(GRID)])]
        args += ["--model-size", "small" if "{run}" in args else "tiny"]
    code, output = run_main(main, capsys, *(arg.format(tmp=tmp_path, **fixtures) for arg in args))
    assert code == 2 and "Traceback" not in output, output
    lines = output.strip().splitlines()
    listing = lines[0].endswith("nothing was run:") and all(line.startswith("  - ") for line in lines[1:])
    assert lines[0].startswith("error: ") and (len(lines) == 1 or listing), output
    assert fix.format(tmp=tmp_path, **fixtures) in output, output


def test_train_warns_when_the_run_never_leaves_warm_up(fixtures, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "run", lambda self: None)  # the warning comes first, before any work
    args = ["train", "--source", fixtures["data"], "--out", tmp_path / "run", "--align-weight", "0", "--steps", "50"]
    args += ["--model-size", "tiny", "--grid", str(GRID), "--device", "cpu", "--loader-workers", "0"]
    with pytest.raises(AttributeError):  # the stand-in returns no result
        main([str(a) for a in args])
    assert capsys.readouterr().err.startswith(
        "warning: --steps 50 is below --warmup-steps 100: the learning rate never reaches --lr (the run ends in "
        "warm-up); lower --warmup-steps or raise --steps"
    )
    assert TrainConfig(source=".", out=tmp_path, steps=100, warmup_steps=100, align_weight=0).warnings() == []


def test_help_says_what_min_cosine_bounds_and_what_pca_draws(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    _, extract_help = run_main(main, capsys, "extract", "--help")
    assert "Held-out *mean* per-token cosine" in extract_help and "1st-percentile and worst" in extract_help
    assert "random:<preset>@<seed>" in extract_help  # no text lost to rich markup
    _, inspect_help = run_main(main, capsys, "inspect-cache", "--help")
    assert "2*views*W x (band + steps*H) pixels" in inspect_help  # as the README and pca_picture_size say
