"""`sf` commands whose options are built from a config dataclass's fields (`sfcache.options.option`).

The config holds each option's default, help text, flag and check; this module only turns its fields into the
signature typer reads (`__signature__`), and the texts typed back into field values. An empty text means the
option's default (what make passes for an unset variable). The library's errors name config fields
(`ExtractConfig.layers`); a command's error names them as its flags (`named_as_flags`), so no message is rewritten.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Any

import typer

from sfcache.errors import Field, Message, SfcacheError, field_of
from sfcache.options import OPTION, OptionInfo


def flag_of(field: dataclasses.Field) -> str:
    """The option's first flag, as messages name it (--checksum of --checksum/--no-checksum)."""
    info: OptionInfo = field.metadata[OPTION]
    return (info.flag or "--" + field.name.replace("_", "-")).split("/")[0]


def flag_names(config: type) -> dict[Field, str]:
    """How `config`'s command names each field that a message may name: an option by its flag, an argument by its
    name in capitals (as --help shows it), another config's field it hands an option on to (`option_like`) by that
    option's flag (reproduce-libero's --extract-batch-size for ExtractConfig.batch_size)."""
    names = {}
    for field in option_fields(config):
        info: OptionInfo = field.metadata[OPTION]
        names[field_of(config, field.name)] = (info.metavar or field.name.upper()) if info.argument else flag_of(field)
        if info.like is not None:
            names[info.like] = flag_of(field)
    return names


def flag_namer(config: type) -> Callable[[Field], str]:
    """How `config`'s command names a field: the flag that sets it (a field of a config that command does not use:
    as that config's own command spells it, `--name`): the one place where a library message about config fields
    becomes a command's."""
    flags = flag_names(config)
    return lambda field: flags.get(field) or "--" + field.name.replace("_", "-")


def named_as_flags(error: SfcacheError, config: type) -> None:
    """Make `error` name each field as the flag that sets it in `config`'s command."""
    error.name_fields(flag_namer(config))


def said_as_flags(message: str | Message, config: type) -> str:
    """`message` (a warning) naming each field as the flag that sets it in `config`'s command."""
    return message.render(flag_namer(config)) if isinstance(message, Message) else message


def option_fields(config: type, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config) if OPTION in f.metadata and f.name not in exclude]


def _field_type(hint: Any) -> type:
    """The field's type without `| None`."""
    return ([kind for kind in typing.get_args(hint) if kind is not type(None)] or [hint])[0]


def _cli_type(hint: Any, info: OptionInfo) -> type:
    """What typer parses: text for fields with a parser and for paths (typer would turn an empty text into
    Path('.'), the current folder, before it could mean the default), else the field's type."""
    kind = _field_type(hint)
    if info.parse is not None or kind is Path:
        return str
    if kind not in (str, int, float, bool):
        raise TypeError(f"option {hint}: give the field a parse= (typer reads only str, int, float, bool, Path)")
    return kind


def _parameter(field: dataclasses.Field, hint: Any, default: Any) -> inspect.Parameter:
    info: OptionInfo = field.metadata[OPTION]
    kind = _cli_type(hint, info)
    metavar = info.metavar or ("PATH" if _field_type(hint) is Path else None)  # read as text, shown as a path
    shown = (
        ...
        if default is MISSING or info.required
        else info.show(default)
        if info.parse and default is not None
        else default
    )
    if info.argument:
        spec = typer.Argument(shown, help=info.help, metavar=metavar, show_default=True)
    else:
        flag = info.flag or "--" + field.name.replace("_", "-")
        if kind is bool and info.flag is None:  # a real flag pair, whatever the default: --x / --no-x
            flag = f"{flag}/--no-{flag[2:]}"
        spec = typer.Option(shown, flag, help=info.help, metavar=metavar)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=spec, annotation=kind)


def path_text(text: str | None, name: str) -> Path | None:
    """A typed-in path (None stays None); an empty text is an error, never the current folder (typer would read
    '' as Path('.'), so that `sf extract ''` scanned the folder it ran in)."""
    if text is None:
        return None
    if not text.strip():
        raise SfcacheError(f"{name}: empty path; give a file or folder (. for the current folder)")
    return Path(text)


def field_values(config: type, given: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Typed-in option values -> config field values; a text its parser refuses is an SfcacheError naming it.
    An empty text is the default: the command's (`defaults`) if it replaces the field's, else left to the config."""
    values, hints, defaults = {}, typing.get_type_hints(config), defaults or {}
    for field in option_fields(config):
        if field.name not in given:
            continue
        value, info = given[field.name], field.metadata[OPTION]
        if value == "" and field.name in defaults:
            value = defaults[field.name]
        elif value == "" and field.default is not MISSING:
            continue  # empty: the config's default
        elif value == "" and _field_type(hints[field.name]) is Path:
            path_text(value, flag_of(field) if not info.argument else info.metavar or field.name.upper())
        if info.parse is not None and isinstance(value, str):
            try:
                value = info.parse(value)
            except ValueError as error:
                raise SfcacheError(f"{flag_of(field)} {value}: {error}") from None
        elif _field_type(hints[field.name]) is Path and isinstance(value, str):
            value = Path(value)
        values[field.name] = value
    return values


def plain_help(command: Any) -> Any:
    """What every command's --help shows, one rule for all (also options that are not config fields): a flag shows
    no `<bool>` value placeholder (it takes none: `--check`, not `--check true`), and an argument is named in
    capitals as the README names it (STORE, PATH) unless it names itself (`metavar=`). Returns `command`."""
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    return command


def config_command(
    config: type, exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> Callable[[Callable], Callable]:
    """Decorate `body(fields: dict, **extras)`: the command takes every option field of `config` (but `exclude`;
    `defaults` replaces a field's CLI default) plus body's own typer parameters, and hands body the field values."""
    defaults = defaults or {}

    def build(body: Callable) -> Callable:
        hints = typing.get_type_hints(config)
        fields = option_fields(config, exclude)
        own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
        parameters = [_parameter(f, hints[f.name], defaults.get(f.name, f.default)) for f in fields]
        parameters += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        names = {f.name for f in fields}

        def command(**given: Any) -> Any:
            chosen = {name: value for name, value in given.items() if name in names}
            try:
                return body(
                    field_values(config, chosen, defaults), **{k: v for k, v in given.items() if k not in names}
                )
            except SfcacheError as error:
                named_as_flags(error, config)
                raise

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        command.__name__, command.__doc__ = body.__name__, body.__doc__
        return command

    return build
