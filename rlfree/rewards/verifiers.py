"""Verifiable rewards for math word problems (GSM8K), in TRL's reward-function convention.

`f(prompts, completions, **kwargs) -> list[float]`: every other dataset column arrives as a keyword argument, so these
plug into `rlfree score --reward rlfree.rewards.verifiers:gsm8k_accuracy` and into TRL's `GRPOTrainer` unchanged.
Completions may be plain strings or TRL conversational completions (a list of message dicts: the last message's
`content` is read).

The completion's final answer is, in order of preference:
1. the content of the last `\\boxed{...}`;
2. the number after the last `#### `;
3. the number after the last "the answer is" / "answer:" (case-insensitive);
4. the last number anywhere in the text.
Numbers may carry thousands separators (`1,234.50`), a sign, a `$` and a trailing `%`; `\\frac{a}{b}` and `a/b`
inside a box are read as fractions. Answers are compared as floats with a small tolerance, so `42.0` equals `42`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..errors import StageInputError

# A number: thousands groups (1,234,567) or plain digits, an optional decimal part; or a bare decimal (.5).
# A leading minus counts only when it is not a binary minus (not right after a digit, letter or closing bracket).
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_FRACTION = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}|(-?[\d.,]+)\s*/\s*(-?[\d.,]+)")
_HASHES = re.compile(r"####\s*(.*)")
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(.*)", re.IGNORECASE | re.DOTALL)

TOLERANCE = 1e-6
FORMAT_REWARD = 0.1


def completion_text(completion) -> str:
    """The text of a completion: a string, a message dict, or a conversation (the last message's content)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return ""


def _normalize(text: str) -> str:
    """Drop what decorates numbers without changing them: dollar signs, LaTeX spacing, unicode minus."""
    text = text.replace("\\$", "").replace("$", "").replace("\u2212", "-")
    return text.replace("\\!", "").replace("\\,", "").replace("\\%", "%")


def _to_float(token: str) -> float | None:
    try:
        value = float(token.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def first_number(text: str) -> float | None:
    match = _NUMBER.search(_normalize(text))
    return _to_float(match.group()) if match else None


def last_number(text: str) -> float | None:
    matches = _NUMBER.findall(_normalize(text))
    return _to_float(matches[-1]) if matches else None


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth = 1
    for index in range(position, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[position:index]
    return None  # unclosed: the completion was cut inside the box


def _boxed_value(content: str) -> float | None:
    fraction = _FRACTION.search(_normalize(content))
    if fraction:
        numerator, denominator = (first_number(part) for part in fraction.groups() if part is not None)
        if numerator is not None and denominator:
            return numerator / denominator
    return first_number(content)


def extract_answer(completion) -> float | None:
    """The completion's final numeric answer (see the module docstring for the order of preference), or None."""
    text = completion_text(completion)
    boxed = _last_boxed(text)
    if boxed is not None:
        return _boxed_value(boxed)
    hashes = _HASHES.findall(text)
    if hashes:
        return first_number(hashes[-1])
    answer_is = list(_ANSWER_IS.finditer(text))
    if answer_is:
        value = first_number(answer_is[-1].group(1)[:80])
        if value is not None:
            return value
    return last_number(text)


def parse_reference(answer) -> float | None:
    """A GSM8K reference: the number after `####` in the dataset's `answer` column, or a bare number."""
    if answer is None:
        return None
    if isinstance(answer, int | float):
        return float(answer) if math.isfinite(answer) else None
    text = str(answer)
    if "####" in text:
        return first_number(text.rsplit("####", 1)[1])
    return last_number(text)


def answers_match(predicted: float | None, reference: float | None, tolerance: float = TOLERANCE) -> bool:
    if predicted is None or reference is None:
        return False
    return abs(predicted - reference) <= tolerance * max(1.0, abs(reference))


def _references(answer, count: int) -> list:
    if answer is None:
        raise StageInputError(
            "gsm8k_accuracy needs an `answer` column in the prompts (the GSM8K solution ending in '#### N', or N); "
            "recipes/prepare_gsm8k.py writes one"
        )
    references = list(answer)
    if len(references) != count:
        raise StageInputError(f"gsm8k_accuracy: {len(references)} answers for {count} completions")
    return references


def gsm8k_accuracy(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the completion's final numeric answer equals the reference answer, else 0.0."""
    references = _references(answer, len(completions))
    return [
        1.0 if answers_match(extract_answer(completion), parse_reference(reference)) else 0.0
        for completion, reference in zip(completions, references, strict=True)
    ]


def gsm8k_format(prompts, completions, **kwargs) -> list[float]:
    """0.1 when the completion ends on an explicit final answer: a `#### N` line or a `\\boxed{N}`, else 0.0.

    "Ends on" means the marker is in the last non-empty line, so a `####` in the middle of a rambling completion earns
    nothing. Add it to the accuracy reward to teach the answer format (`--reward rlfree.rewards.verifiers:gsm8k_accuracy
    --reward rlfree.rewards.verifiers:gsm8k_format`); it is small so that it never outweighs a correct answer.
    """
    rewards = []
    for completion in completions:
        lines = [line for line in completion_text(completion).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        marked = _HASHES.search(last)
        boxed = _last_boxed(last)
        ok = (marked is not None and first_number(marked.group(1)) is not None) or (
            boxed is not None and _boxed_value(boxed) is not None
        )
        rewards.append(FORMAT_REWARD if ok else 0.0)
    return rewards
