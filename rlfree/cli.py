"""`rlfree <stage> [flags]`: a thin layer over the stage functions.

Flags are the dataclass fields of each stage (underscore spelling, as in Hugging Face tools); `train` takes every
`TrainingArguments` flag too. `--config recipe.yaml` supplies any of them: top-level keys, or keys under a section
named after the command (which win); flags on the command line win over both.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from .errors import StageInputError

COMMANDS = ("generate", "score", "weight", "train", "run", "inspect", "sample", "evaluate", "ab", "baseline", "demo")


def command_types(command: str) -> tuple:
    """The dataclasses a command's flags fill (imported lazily: `rlfree --help` stays fast)."""
    if command == "generate":
        from .generation import GenerateConfig

        return (GenerateConfig,)
    if command == "score":
        from .rewards import ScoreConfig

        return (ScoreConfig,)
    if command == "weight":
        from .weighting import WeightConfig

        return (WeightConfig,)
    if command == "train":
        from .training import ModelConfig, RLFreeConfig

        return (ModelConfig, RLFreeConfig)
    if command == "run":
        from .pipeline import RunConfig

        return (RunConfig,)
    if command == "inspect":
        from .inspection import InspectConfig

        return (InspectConfig,)
    if command == "sample":
        from .sampling import SampleConfig

        return (SampleConfig,)
    if command == "evaluate":
        from .evaluation import EvaluateConfig

        return (EvaluateConfig,)
    if command == "ab":
        from .evaluation import ABConfig

        return (ABConfig,)
    if command == "baseline":
        try:
            from .baselines import BaselineConfig, BaselineRLOOConfig
        except ImportError as error:
            raise StageInputError(
                f"`rlfree baseline` needs TRL ({error}); install it from the repository root with: "
                "pip install -e '.[baselines]'"
            ) from None
        return (BaselineConfig, BaselineRLOOConfig)
    from .demo import DemoConfig

    return (DemoConfig,)


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


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
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

    recipe, rest = _split_config(argv)
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


def _report(message: str) -> None:
    """Print once: under `accelerate launch` every process runs the stage, and only the main one speaks."""
    from .data import process_state

    if process_state().is_main_process:
        print(message)


def _generate(argv: list[str]) -> None:
    from .generation import generate

    (config,) = parse_command("generate", command_types("generate"), argv)
    dataset = generate(config)
    _report(f"wrote {len(dataset)} completions to {config.output_dir}")


def _score(argv: list[str]) -> None:
    from .rewards import score

    (config,) = parse_command("score", command_types("score"), argv)
    dataset = score(config)
    _report(f"wrote {len(dataset)} scored completions to {config.output_dir}")


def _weight(argv: list[str]) -> None:
    from .weighting import weight

    (config,) = parse_command("weight", command_types("weight"), argv)
    weight(config)
    _report(f"wrote weights to {config.output_dir}")


def _train(argv: list[str]) -> None:
    from .training import train

    model_config, args = parse_command("train", command_types("train"), argv)
    trainer = train(model_config, args)
    if trainer.is_world_process_zero():
        print(f"wrote the trained model to {args.output_dir}")


def _run(argv: list[str]) -> None:
    from .pipeline import run_recipe

    recipe, _ = _split_config(argv)
    (config,) = parse_command("run", command_types("run"), argv)
    if not recipe:
        raise StageInputError("`rlfree run` needs --config recipe.yaml (a section per stage; see recipes/toy.yaml)")
    models = run_recipe(recipe, config)
    _report(f"trained model{'s' if len(models) > 1 else ''}: {', '.join(models)}")


def _inspect(argv: list[str]) -> None:
    from .inspection import inspect

    if argv and not argv[0].startswith("-"):
        argv = ["--input_dir", *argv]  # `rlfree inspect DIR`
    usage = "%(prog)s DIR [flags]   (DIR: the folder to inspect, the same as --input_dir DIR)"
    (config,) = parse_command("inspect", command_types("inspect"), argv, usage=usage)
    inspect(config)


def _sample(argv: list[str]) -> None:
    from .sampling import soft_best_of_n

    (config,) = parse_command("sample", command_types("sample"), argv)
    picked = soft_best_of_n(config)
    _report(f"wrote {len(picked)} picked completions to {config.output_dir}/picked")


def _evaluate(argv: list[str]) -> None:
    from .evaluation import evaluate

    (config,) = parse_command("evaluate", command_types("evaluate"), argv)
    evaluate(config)


def _ab(argv: list[str]) -> None:
    from .evaluation import ab

    (config,) = parse_command("ab", command_types("ab"), argv)
    ab(config)


def _baseline(argv: list[str]) -> None:
    config, args = parse_command("baseline", command_types("baseline"), argv)  # first: it explains a missing TRL
    from .baselines import train_baseline

    trainer = train_baseline(config, args)
    if trainer.is_world_process_zero():
        print(f"wrote the RLOO baseline (beta={args.beta}) to {args.output_dir}")


def _demo(argv: list[str]) -> None:
    from .demo import run_demo

    (config,) = parse_command("demo", command_types("demo"), argv)
    run_demo(config)


HANDLERS: dict[str, Callable[[list[str]], None]] = {
    "generate": _generate,
    "score": _score,
    "weight": _weight,
    "train": _train,
    "run": _run,
    "inspect": _inspect,
    "sample": _sample,
    "evaluate": _evaluate,
    "ab": _ab,
    "baseline": _baseline,
    "demo": _demo,
}

USAGE = """usage: rlfree <command> [flags]   (rlfree <command> --help for its flags)

commands:
  generate   sample N completions per prompt from the reference model, with exact log-probabilities
  score      add rewards from a Python function (TRL signature) or a reward model
  weight     self-normalized importance weights: rlhf exp(r/beta), rlif pi_ref^gamma, or both
  train      weighted maximum likelihood (a transformers Trainer); also under `accelerate launch -m rlfree`
  run        every stage of a recipe (--config recipe.yaml) in order, for `rounds` rounds; skips finished stages
  inspect    summary and plots of any stage's output folder: rewards, weights, ESS, KL against beta
  sample     soft best-of-N: one of N reference samples with probability softmax(r / beta), no training
  evaluate   a model's mean reward and its KL to a reference (k1, k3), with confidence intervals
  ab         model A against model B on the same prompts and reward: win rate with a bootstrap interval
  baseline   the on-policy baseline: TRL's RLOO on the same prompts, reward and beta (pip install -e '.[baselines]')
  demo       the whole pipeline offline on a tiny arithmetic task, with exact KL figures
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"rlfree: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    try:
        HANDLERS[command](rest)
    except StageInputError as error:
        print(f"rlfree {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
