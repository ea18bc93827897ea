"""GSM8K verifiable rewards: answer extraction, numeric comparison, and use through `rlfree score`."""

from __future__ import annotations

import pytest
from datasets import Dataset, load_from_disk

from rlfree.errors import StageInputError
from rlfree.rewards.scoring import load_reward_function
from rlfree.rewards.verifiers import (
    FORMAT_REWARD,
    answers_match,
    completion_text,
    extract_answer,
    gsm8k_accuracy,
    gsm8k_format,
    parse_reference,
)
from rlfree.stages.score import ScoreConfig, score


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # \boxed{} wins over everything else, nested braces included
        ("So 3 + 4 = 7 and the total is \\boxed{72}.", 72.0),
        ("#### 5\nActually \\boxed{\\$1,234.50}", 1234.5),
        ("\\boxed{\\text{42 apples}}", 42.0),
        ("\\boxed{-3}", -3.0),
        ("\\boxed{\\frac{3}{4}}", 0.75),
        ("\\boxed{1/4}", 0.25),
        ("first \\boxed{1} then \\boxed{2}", 2.0),
        # #### N, the GSM8K format (last one wins, next line allowed)
        ("She has 5 + 3 = 8 apples.\n#### 8", 8.0),
        ("#### 1,234", 1234.0),
        ("#### $18.", 18.0),
        ("#### -7", -7.0),
        ("#### 4\n#### 9", 9.0),
        ("####\n12", 12.0),
        # "The answer is N"
        ("5 times 3 is 15, minus 2 gives 13. The answer is 13.", 13.0),
        ("The final answer is: $1,000,000", 1000000.0),
        ("answer: -0.5 dollars, from 3 steps", -0.5),
        ("The answer is 12. I checked it twice in 2 ways.", 12.0),
        # the last number in the text
        ("3 + 4 = 7, so she pays 7 dollars", 7.0),
        ("It costs $2,500.75 in total.", 2500.75),
        ("10-3 = 7", 7.0),
        ("The temperature drops to -4", -4.0),
        ("He is 50% done", 50.0),
        ("Numbers: 1,2,3", 3.0),
        ("\u22125 degrees", -5.0),
        ("x = .5", 0.5),
        # nothing to read
        ("", None),
        ("I don't know.", None),
        ("The answer is unknown.", None),
        ("\\boxed{", None),
        (None, None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
        ("#### 1,234", 1234.0),
        ("...\n#### -15", -15.0),
        ("#### 3.50", 3.5),
        ("72", 72.0),
        ("1,234.50", 1234.5),
        (18, 18.0),
        (2.5, 2.5),
        (None, None),
        ("no number", None),
    ],
)
def test_parse_reference(reference, expected):
    assert parse_reference(reference) == expected


def test_answers_match_is_numeric_with_a_tolerance():
    assert answers_match(42.0, 42.0)
    assert answers_match(42.0000001, 42.0)
    assert answers_match(1e7 + 1e-3, 1e7)
    assert not answers_match(42.01, 42.0)
    assert not answers_match(-42.0, 42.0)
    assert not answers_match(None, 42.0)
    assert not answers_match(42.0, None)


def test_completion_text_accepts_strings_and_conversations():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "#### 3"}]) == "#### 3"
    chat = [{"role": "assistant", "content": "thinking"}, {"role": "assistant", "content": "final 9"}]
    assert completion_text(chat) == "final 9"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    assert completion_text([]) == ""
    assert completion_text({"role": "assistant", "content": None}) == ""


def test_gsm8k_accuracy_compares_each_completion_with_its_reference():
    completions = [
        "The answer is 42.0",  # 42.0 == 42
        "#### 1,234.50",  # commas and decimals
        "\\boxed{\\$-5}",  # negative with a dollar sign
        "So the answer is 17.",  # wrong
        "",  # empty
        [{"role": "assistant", "content": "Total: 8 apples\n#### 8"}],  # TRL conversational completion
        "She ends with 6 marbles",  # last number
        "\\boxed{7} and then 8",  # boxed wins over the last number
    ]
    answers = ["Step 1...\n#### 42", "#### 1234.5", "-5", "#### 71", "#### 3", "8", "6", "#### 7"]
    rewards = gsm8k_accuracy(prompts=["q"] * len(completions), completions=completions, answer=answers, extra=1)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(isinstance(value, float) for value in rewards)


def test_gsm8k_accuracy_returns_one_value_per_completion():
    assert gsm8k_accuracy([], [], answer=[]) == []
    assert len(gsm8k_accuracy(["q"] * 5, ["1"] * 5, answer=["1"] * 5)) == 5


def test_gsm8k_accuracy_needs_an_answer_column():
    with pytest.raises(StageInputError, match="answer"):
        gsm8k_accuracy(["q"], ["#### 1"])
    with pytest.raises(StageInputError, match="2 answers for 1"):
        gsm8k_accuracy(["q"], ["#### 1"], answer=["1", "2"])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("3 + 4 = 7\n#### 7", FORMAT_REWARD),
        ("So the total is \\boxed{7}.", FORMAT_REWARD),
        ("#### 7\n\n", FORMAT_REWARD),
        ([{"role": "assistant", "content": "ok\n#### 7"}], FORMAT_REWARD),
        ("#### 7\nand some more rambling", 0.0),
        ("The answer is 7", 0.0),
        ("#### seven", 0.0),
        ("", 0.0),
    ],
)
def test_gsm8k_format(completion, expected):
    assert gsm8k_format(prompts=["q"], completions=[completion]) == [expected]


def test_gsm8k_accuracy_through_rlfree_score(tmp_path):
    generated = Dataset.from_dict(
        {
            "prompt": ["What is 40 + 2?"] * 3 + ["How much is 1,000 + 234.5 dollars?"] * 2,
            "completion": ["40 + 2 = 42\n#### 42", "The answer is 41.", "", "\\boxed{\\$1,234.50}", "#### 1234"],
            "prompt_index": [0, 0, 0, 1, 1],
            "sample_index": [0, 1, 2, 0, 1],
            "prompt_ids": [[1, 2]] * 5,
            "completion_ids": [[3, 4]] * 5,
            "answer": ["40 + 2 = <<40+2=42>>42\n#### 42"] * 3 + ["#### 1,234.5"] * 2,
        }
    )
    generated.save_to_disk(str(tmp_path / "generated"))
    spec = "rlfree.rewards.verifiers:gsm8k_accuracy"
    assert load_reward_function(spec) is gsm8k_accuracy
    score(
        ScoreConfig(
            input_dir=str(tmp_path / "generated"),
            output_dir=str(tmp_path / "scored"),
            reward=[spec, "rlfree.rewards.verifiers:gsm8k_format"],
        )
    )
    scored = load_from_disk(str(tmp_path / "scored"))
    assert scored["reward_gsm8k_accuracy"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert scored["reward_gsm8k_format"] == [FORMAT_REWARD, 0.0, 0.0, FORMAT_REWARD, FORMAT_REWARD]
    assert scored["reward"] == pytest.approx([1.1, 0.0, 0.0, 1.1, 0.1])
