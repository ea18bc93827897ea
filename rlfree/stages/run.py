"""`rlfree run --config recipe.yaml`: every stage of a recipe in order, optionally for several rounds.

Each stage reads its section of the recipe exactly as `rlfree <stage> --config recipe.yaml` would. A stage whose
output folder is already complete with the same settings is skipped, so a killed run is resumed by running it again;
a complete folder written with other settings is refused rather than silently reused.

Round k + 1 (`rounds: K`) samples from the model trained in round k and reads log pi_ref from the recipe's reference
(`generate --ref_model`), so the weights correct exactly for the new proposal and the target stays
pi_ref * exp(r / beta): the rounds refine the estimate of one fixed target instead of re-tilting the new model.
Every round trains from the recipe's model on its own round's data, so the finite-sample error of one round does not
carry into the next (warm-starting from round k's model measured worse on the toy: after two rounds of N = 32,
KL(pi* || pi_theta) / KL(pi* || pi_ref) was 0.27 against 0.21).
Round k's folders are the recipe's with `_round{k}` appended.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..commands import command_function, command_types
from ..data import describe_changes, process_state, read_sidecars, recorded_changes
from ..errors import StageInputError
from ..recipe import parse_command, recipe_sections

STAGES = ("generate", "score", "weight", "train")
# The sidecar each stage leaves in its output folder, written last: its presence means the folder is complete.
SIDECAR_OF = {"generate": "generation", "score": "scoring", "weight": "weighting", "train": "training"}


@dataclass
class RunConfig:
    """Settings of `rlfree run` (the stages' own settings come from the recipe's sections)."""

    rounds: int = field(
        default=1,
        metadata={"help": "Rounds of generate -> score -> weight -> train; round k + 1 samples from round k's model."},
    )

    def __post_init__(self):
        if self.rounds < 1:
            raise StageInputError(f"rounds must be >= 1, got {self.rounds}")


def round_path(path: str, round_number: int) -> str:
    return path if round_number == 1 else f"{path.rstrip('/')}_round{round_number}"


def stage_settings(stage: str, configs: tuple) -> dict[str, Any]:
    """The settings a stage records and that a re-run must match (unset values are not compared)."""
    if stage == "train":
        from .train import training_settings

        return training_settings(*configs)
    (config,) = configs
    return asdict(config)


def _sidecar_time(directory: str) -> float | None:
    """When the stage that wrote `directory` finished (its newest sidecar), or None if none did."""
    times = [path.stat().st_mtime for path in Path(directory).glob("*.json") if path.stem in SIDECAR_OF.values()]
    return max(times, default=None)


def stage_inputs(stage: str, configs: tuple) -> list[str]:
    """The folders a stage reads: if one was rewritten after the stage finished, the stage's output is stale."""
    if stage == "train":
        return [configs[1].dataset_dir, configs[0].model_name_or_path]
    config = configs[0]
    return [config.model_name_or_path] if stage == "generate" else [config.input_dir]


def is_complete(stage: str, configs: tuple, output_dir: str) -> bool:
    """Whether `output_dir` holds this stage's finished output, newer than its inputs; refuses other settings."""
    different = recorded_changes(output_dir, SIDECAR_OF[stage], stage_settings(stage, configs))
    if different is None:
        return False
    finished = Path(output_dir, f"{SIDECAR_OF[stage]}.json").stat().st_mtime
    if any((_sidecar_time(path) or 0) > finished for path in stage_inputs(stage, configs)):
        return False
    if stage == "score":
        from ..rewards.scoring import reward_fingerprints

        # A reward function edited since the folder was scored makes it stale, though its flags are the same.
        recorded = read_sidecars(output_dir)["scoring"].get("reward_fingerprints")
        if recorded != json.loads(json.dumps(reward_fingerprints(configs[0]))):
            return False
    if different:
        raise StageInputError(
            f"{output_dir} already holds a complete `{stage}` output written with other settings "
            f"({describe_changes(different)}). Delete the folder, or point the recipe's output_dir elsewhere."
        )
    return True


def round_overrides(stage: str, round_number: int, paths: dict[str, str], reference: str, seed: int) -> list[str]:
    """Command-line overrides that chain round `round_number`'s stages through its own folders."""
    if round_number == 1:
        return []
    previous_model = round_path(paths["train"], round_number - 1)
    data_source = "score" if "score" in paths else "generate"
    here = {name: round_path(path, round_number) for name, path in paths.items()}
    if stage == "generate":
        return [
            "--model_name_or_path",
            previous_model,
            "--ref_model",
            reference,
            "--seed",
            str(seed + round_number - 1),
        ]
    if stage == "score":
        return ["--input_dir", here["generate"]]
    if stage == "weight":
        return ["--input_dir", here[data_source]]
    return ["--dataset_dir", here["weight"]]


def run_recipe(recipe: str, config: RunConfig) -> list[str]:
    """Run the recipe's stages for `config.rounds` rounds; returns the trained model folder of each round."""
    # Under `accelerate launch` every process walks the same stages (generate, score and train share the work);
    # the main one speaks for them, and each stage ends with all of them in step.
    state = process_state()
    sections = recipe_sections(recipe)
    missing = [stage for stage in ("generate", "weight", "train") if stage not in sections]
    if missing:
        raise StageInputError(f"--config {recipe}: `rlfree run` needs sections {missing} (score is optional for rlif)")
    stages = [stage for stage in STAGES if stage in sections]
    first = {stage: parse_command(stage, command_types(stage), ["--config", recipe]) for stage in stages}
    paths = {stage: configs[-1].output_dir for stage, configs in first.items()}
    generation = first["generate"][0]
    reference = generation.ref_model or generation.model_name_or_path
    models = []
    for round_number in range(1, config.rounds + 1):
        for stage in stages:
            overrides = round_overrides(stage, round_number, paths, reference, generation.seed)
            output_dir = round_path(paths[stage], round_number)
            configs = parse_command(
                stage, command_types(stage), ["--config", recipe, *overrides, "--output_dir", output_dir]
            )
            label = f"round {round_number}/{config.rounds} {stage}"
            complete = is_complete(stage, configs, output_dir)
            if state.is_main_process:
                print(f"[{label}] {output_dir} is complete: skipped" if complete else f"[{label}] -> {output_dir}")
            if not complete:
                command_function(stage)(*configs)
            state.wait_for_everyone()
        models.append(round_path(paths["train"], round_number))
    return models


def run_command(config: RunConfig, recipe: str) -> str:
    models = run_recipe(recipe, config)
    return f"trained model{'s' if len(models) > 1 else ''}: {', '.join(models)}"
