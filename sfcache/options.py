"""Config fields that are also command-line options: the help text, flag and text parser live on the field.

A config dataclass (`ExtractConfig`, `TrainConfig`, ...) stays the one place of each default and each check
(its `__post_init__`); `sfcache.cli.options` builds the `sf` command's options from these fields, so the CLI
repeats none of them. Fields made with plain `dataclasses.field` (or a bare default) are not options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from sfcache.errors import Field, field_of

OPTION = "sfcache.option"  # the metadata key
IDENTITY = "sfcache.identity"  # metadata key of a field a resume must match (`sfcache.provenance.identity_fields`)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """How one field is offered on the command line."""

    help: str
    flag: str | None = None  # e.g. "--checksum/--no-checksum"; default --field-name
    parse: Callable[[str], Any] | None = None  # text -> value; raises ValueError("expected ...")
    show: Callable[[Any], str] | None = None  # value -> text, for --help (needed with parse)
    argument: bool = False  # a positional argument instead of an option
    metavar: str | None = None
    # the command needs a value (marked required in --help); the field's default (None) stays, so an empty text,
    # what make passes for an unset variable, reaches the config, whose checks name the option with the others
    required: bool = False
    like: Field | None = None  # the other config's field this option is handed on to (`option_like`)


def option(default: Any = MISSING, help: str = "", identity: bool = False, **how: Any) -> Any:
    """A dataclass field with a default (none: required) that is also a CLI option; `how`: `OptionInfo`'s fields.
    `identity`: a resumed run must ask for the same value."""
    metadata = {OPTION: OptionInfo(help=help, **how), **({IDENTITY: True} if identity else {})}
    return dataclasses.field(default=default, metadata=metadata)


def comma_list(text: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); what every comma-list option (--views, --suites) takes."""
    return tuple(part.strip() for part in text.split(","))


def int_list(text: str) -> tuple[int, ...]:
    """'23' or '-1,11' -> (23,) or (-1, 11): what every list-of-layers option (--layers) takes."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("expected comma-separated integers, e.g. 23 or -1,11") from None


def comma_text(values: tuple) -> str:
    return ",".join(map(str, values))


def square_grid(text: str) -> int:
    """'16' or '16x16' -> 16: a square token grid per side, also spelled as `sf extract --grid` spells it."""
    side, _, other = text.strip().lower().partition("x")
    if not side.isdigit() or int(side) < 1 or other not in ("", side):
        raise ValueError("expected N or NxN (a square grid, e.g. 16 or 16x16)")
    return int(side)


def square_grid_text(side: int) -> str:
    return f"{side}x{side}"


def user_path(text: str) -> Path:
    """A path with ~ expanded (make passes it unexpanded)."""
    return Path(text).expanduser()


def option_like(config: type, name: str, default: Any = MISSING, **how: Any) -> Any:
    """An option field offered like `config`'s field `name`: its default, help, parser and display, so a command
    that hands the value on to `config` repeats none of them; `default` and `how` (`OptionInfo`'s fields) replace
    those the borrowing command deliberately gives otherwise."""
    field = _field(config, name)
    return dataclasses.field(
        default=field.default if default is MISSING else default,
        metadata={OPTION: dataclasses.replace(field.metadata[OPTION], like=field_of(config, name), **how)},
    )


def default_of(config: type, name: str) -> Any:
    """`config`'s default of field `name`: for a command's own option that means the same as that field."""
    return _field(config, name).default


def _field(config: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config) if f.name == name)


def handed_on(config: type, renamed: Mapping[Field, str] | None = None) -> dict[Field, Field]:
    """{another config's field: `config`'s field that sets it}: each option `config` borrows with `option_like`,
    plus `renamed` ({field: name of `config`'s field}), a field set from an option of another name. A check of that
    other config then names `config`'s fields (`Message.renamed`), which its command shows as its own flags."""
    mapping = {
        info.like: field_of(config, field.name)
        for field in dataclasses.fields(config)
        if (info := field.metadata.get(OPTION)) is not None and info.like is not None
    }
    return mapping | {other: field_of(config, name) for other, name in (renamed or {}).items()}


def same_fields(source: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """{name: source.name} for fields that one config or record hands on unchanged to another of the same names."""
    return {name: getattr(source, name) for name in names}
