"""YAML recipes and flags -> a command's dataclasses: one parser for the CLI and for `rlfree run`.

A recipe holds any command's flags: top-level keys (shared by every command that has the flag), or keys under a
section named after the command (which win); flags on the command line win over both.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import yaml

from .commands import COMMANDS, command_types
from .errors import StageInputError


def _flags(dataclass_types: tuple) -> set[str]:
    from transformers import HfArgumentParser

    return {action.dest for action in HfArgumentParser(dataclass_types)._actions}


def _optional_flags(command: str) -> set[str]:
    """A command's flags, or none when it needs an extra that is not installed (TRL for `baseline`)."""
    try:
        return _flags(command_types(command))
    except StageInputError:
        return set()


def recipe_sections(path: str) -> dict:
    """A recipe file's top-level mapping: shared flags, plus a section per command."""
    if not Path(path).is_file():
        raise StageInputError(f"--config {path}: no such file")
    try:
        recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise StageInputError(f"--config {path}: not valid YAML{where} ({problem})") from None
    except UnicodeDecodeError:
        raise StageInputError(f"--config {path}: not UTF-8 text; save the recipe as UTF-8") from None
    if not isinstance(recipe, dict):
        raise StageInputError(f"--config {path}: expected a mapping of flag names to values")
    return recipe


def _recipe_values(path: str, command: str, flags: set[str]) -> dict:
    """This command's values from a recipe: top-level keys it has, then its own section (which wins).

    A top-level key belongs to every command that has that flag, so one recipe can drive all stages; a key that no
    command has, or a section key this command lacks, is an error.
    """
    recipe = recipe_sections(path)
    section = recipe.get(command) or {}
    flat = {key: value for key, value in recipe.items() if key not in COMMANDS}
    unknown = sorted(set(section) - flags)
    stray = sorted(set(flat) - flags)
    if stray:
        known_elsewhere = set().union(*(_optional_flags(other) for other in COMMANDS if other != command))
        unknown += [key for key in stray if key not in known_elsewhere]
    if unknown:
        raise StageInputError(f"--config {path}: unknown key(s) for `rlfree {command}`: {sorted(unknown)}")
    return {key: value for key, value in flat.items() if key in flags} | section


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--config`'s value, and the other arguments (no prefix matching: `--conf` is not `--config`)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    return known.config, rest


def _given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[argparse.Action]:
    """The parser's actions named on the command line; an unknown flag is an error naming a close match.

    Checked before the dataclasses are built, because their `__post_init__` runs first inside
    `parse_args_into_dataclasses`: a misspelled `--beat 0.5` would otherwise be reported as a missing `--beta`.
    """
    actions = {option: action for action in parser._actions for option in action.option_strings}
    canonical = [action.option_strings[0] for action in parser._actions if action.option_strings[0].startswith("--")]
    given, unknown = [], []
    for token in argv:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag in actions:
            given.append(actions[flag])
            continue
        close = difflib.get_close_matches(flag, canonical, n=1)
        unknown.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    if unknown:
        raise StageInputError("; ".join(unknown))
    return given


_KINDS = {int: "an integer", float: "a number"}


def _typed_value(recipe: str, key: str, value, action: argparse.Action):
    """A recipe's value, checked and converted as argparse checks and converts the same flag on the command line.

    argparse converts only the string defaults it is given, so without this `num_samples: 16.7` would reach the stage
    as a float. A mapping, or a list for a single-valued flag, is passed on as it is: TrainingArguments takes one for
    some fields that no command-line string can hold (`deepspeed` or `fsdp_config` as a mapping, `report_to` as a list).
    """
    many = action.nargs in ("+", "*")
    if value is None or isinstance(value, dict) or (isinstance(value, list) and not many):
        return value
    items = value if isinstance(value, list) else [value]
    converted = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise StageInputError(f"--config {recipe}: {key} takes plain values, got {item!r}")
        try:
            item = action.type(str(item)) if action.type is not None else item
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = _KINDS.get(action.type, f"a valid --{key}")
            raise StageInputError(f"--config {recipe}: {key} must be {kind}, got {item!r}") from None
        if action.choices is not None and item not in action.choices:
            raise StageInputError(
                f"--config {recipe}: {key} must be one of {', '.join(map(str, action.choices))}, got {item!r}"
            )
        converted.append(item)
    return converted if many else converted[0]


def parse_command(command: str, dataclass_types: tuple, argv: list[str], usage: str | None = None) -> tuple:
    """Parse `argv` into the dataclasses, with defaults taken from `--config` when given.

    A flag on the command line also drops, from the recipe's values, the alternatives its dataclass declares in
    `RECIPE_ALTERNATIVES` (`--target_kl` replaces a recipe's `beta` instead of conflicting with it).
    """
    from transformers import HfArgumentParser

    recipe, rest = split_config(argv)
    parser = HfArgumentParser(dataclass_types, prog=f"rlfree {command}", usage=usage, allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe holding any of these flags.")
    given = {action.dest for action in _given_flags(parser, rest)}
    if recipe:
        destinations = {action.dest: action for action in parser._actions}
        values = _recipe_values(recipe, command, set(destinations))
        groups = [group for kind in dataclass_types for group in getattr(kind, "RECIPE_ALTERNATIVES", ())]
        overridden = {name for group in groups if given & set(group) for name in group} - given
        values = {key: value for key, value in values.items() if key not in overridden}
        for key, value in values.items():
            destinations[key].required = False
            values[key] = _typed_value(recipe, key, value, destinations[key])
        parser.set_defaults(**values)
    *parsed, _, remaining = parser.parse_args_into_dataclasses(
        rest, look_for_args_file=False, return_remaining_strings=True
    )
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(parsed)
