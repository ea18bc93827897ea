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
    recipe = yaml.safe_load(Path(path).read_text()) or {}
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
            if destinations[key].nargs in ("+", "*") and not isinstance(value, list):
                values[key] = [value]
        parser.set_defaults(**values)
    *parsed, _, remaining = parser.parse_args_into_dataclasses(
        rest, look_for_args_file=False, return_remaining_strings=True
    )
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    return tuple(parsed)
