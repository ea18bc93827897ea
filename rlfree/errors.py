"""Errors and argument checks every command shares; imports nothing heavy, so `rlfree --help` stays fast."""

from __future__ import annotations

import dataclasses
import math


class StageInputError(ValueError):
    """Bad input to a stage: the message names the field and the fix."""


def check_finite(config) -> None:
    """Refuse NaN and infinity in every float field of a dataclass (and in lists of floats).

    `float("inf")` and `float("nan")` parse as floats, and comparisons with NaN are all False, so a range check such as
    `beta > 0` alone lets them through; no flag of rlfree or of TrainingArguments means anything at NaN or infinity.
    """
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise StageInputError(f"--{spec.name} must be a finite number, got {value}")


def check_ranges(config, limits: dict[str, tuple[bool, str]]) -> None:
    """Refuse the first field of `config` whose check failed: {field: (valid, requirement)} gives
    "--field must be <requirement>, got <value>"."""
    for name, (valid, requirement) in limits.items():
        if not valid:
            raise StageInputError(f"--{name} must be {requirement}, got {getattr(config, name)}")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """argparse checks `choices` on the command line; this checks them for configs built in Python too."""
    if value not in choices:
        raise StageInputError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
