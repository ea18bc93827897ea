"""Reward functions (TRL signature), their combination and failures, and reward models."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from datasets import Dataset, load_from_disk

from rlfree import toy
from rlfree.errors import StageInputError
from rlfree.rewards.scoring import RewardModel, load_reward_function, score_dataset
from rlfree.stages.generate import generate
from rlfree.stages.score import ScoreConfig, score
from tests.helpers import one_line_error, write_module, write_reward


def generated_dataset(**extra_columns) -> Dataset:
    """Three completions shaped like `rlfree generate` output (prompt, completion, ids, indices)."""
    columns = {
        "prompt": ["1 + 2 =", "1 + 2 =", "4 + 4 ="],
        "completion": [" 3", " 4", " 8"],
        "prompt_index": [0, 0, 1],
        "sample_index": [0, 1, 0],
        "prompt_ids": [[3, 12, 4, 13], [3, 12, 4, 13], [6, 12, 6, 13]],
        "completion_ids": [[5, 0], [6], [10, 0]],
        "answer": ["3", "3", "8"],
    }
    columns.update(extra_columns)
    return Dataset.from_dict(columns)


# --- load_reward_function --------------------------------------------------------------------------------------------


def test_load_reward_function_from_a_file_path(tmp_path):
    path = write_module(
        tmp_path / "r.py",
        """
        def length_reward(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        """,
    )
    function = load_reward_function(f"{path}:length_reward")
    assert function(prompts=["a", "b"], completions=["xyz", ""]) == [3.0, 0.0]


def test_load_reward_function_from_a_module_spec():
    function = load_reward_function("rlfree.toy:arithmetic_reward")
    assert function is toy.arithmetic_reward
    assert function(["1 + 2 =", "9 + 9 ="], [" 3", " 1 7"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec", ["rewards.py", "rlfree.toy", "rlfree.toy:", ":arithmetic_reward"])
def test_reward_spec_without_module_and_function_is_rejected(spec):
    with pytest.raises(StageInputError, match=r"expected path/to/file\.py:FUNC or package\.module:FUNC"):
        load_reward_function(spec)


def test_reward_spec_with_a_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nowhere.py"
    with pytest.raises(StageInputError, match=re.escape(f"file {missing} not found")):
        load_reward_function(f"{missing}:f")


def test_reward_spec_with_a_missing_function_names_it(tmp_path):
    path = write_module(tmp_path / "r_nofunc.py", "VALUE = 1\n")
    with pytest.raises(StageInputError, match=r"has no function 'VALUE'"):
        load_reward_function(f"{path}:VALUE")
    with pytest.raises(StageInputError, match=r"has no function 'no_such_reward'"):
        load_reward_function("rlfree.toy:no_such_reward")


def test_reward_spec_with_an_unimportable_module_names_it():
    with pytest.raises(StageInputError, match=r"cannot import module 'rlfree_no_such_module'"):
        load_reward_function("rlfree_no_such_module:f")


# --- score_dataset ---------------------------------------------------------------------------------------------------


def test_score_dataset_passes_columns_as_kwargs_and_combines_weighted_rewards():
    seen_kwargs = []

    def exact_answer(prompts, completions, **kwargs):
        seen_kwargs.append(sorted(kwargs))
        return [float(c.strip() == a) for c, a in zip(completions, kwargs["answer"], strict=True)]

    def token_count(prompts, completions, completion_ids, **kwargs):
        return [len(ids) for ids in completion_ids]

    scored = score_dataset(generated_dataset(), [exact_answer, token_count], weights=[1.0, 0.5], batch_size=2)
    columns = scored.to_dict()

    # exact_answer = 1, 0, 1; token_count = 2, 1, 2; reward = exact + 0.5 * count
    assert columns["reward_exact_answer"] == [1.0, 0.0, 1.0]
    assert columns["reward_token_count"] == [2.0, 1.0, 2.0]
    assert columns["reward"] == [2.0, 0.5, 2.0]
    assert columns["answer"] == ["3", "3", "8"]
    expected_kwargs = ["answer", "completion_ids", "prompt_ids", "prompt_index", "sample_index"]
    assert seen_kwargs == [expected_kwargs, expected_kwargs]  # two batches of at most 2 rows


def test_score_dataset_replaces_an_existing_reward_column():
    def one(prompts, completions, **kwargs):
        return [1.0] * len(prompts)

    scored = score_dataset(generated_dataset(reward=[9.0, 9.0, 9.0]), [one], weights=[3.0])
    assert scored.to_dict()["reward"] == [3.0, 3.0, 3.0]


def test_reward_of_the_wrong_length_names_the_reward_and_the_counts():
    def too_short(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(StageInputError, match=r"reward reward_too_short returned 1 values for 3 completions"):
        score_dataset(generated_dataset(), [too_short])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    return 1.0", r"returned float 1.0 .*must return a list with one float per completion"),
        ("    return ['good'] * len(completions)", r"returned str 'good' for row 0: rewards must be numbers"),
        ("    return [1.0]", r"returned 1 values for 16 completions"),
    ],
)
def test_reward_functions_returning_the_wrong_shape_are_named(generated, tmp_path, body, message):
    spec = write_reward(tmp_path / "bad.py", body)
    with pytest.raises(StageInputError, match=message):
        score(ScoreConfig(input_dir=str(generated), output_dir=str(tmp_path / "scored"), reward=[spec]))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("    import sys\n    sys.exit(0)", "called sys.exit(0) (at"),
        ("    return ['1.0'] * len(completions)", "returned str '1.0' for row 0: rewards must be numbers"),
    ],
)
def test_rewards_that_end_the_process_or_return_text_are_named(generated, tmp_path, body, message, run_cli):
    """`sys.exit(0)` in a reward ended rlfree with exit 0 and no output; numeric strings passed as rewards."""
    spec = write_reward(tmp_path / "reward.py", body)
    code, _, err = run_cli(["score", "--input_dir", generated, "--reward", spec, "--output_dir", tmp_path / "s"])
    assert one_line_error(code, err, "score") and message in err and not (tmp_path / "s").exists()


def test_trl_conversational_reward_functions_get_trl_conversational_inputs(reference_dir, generate_config, tmp_path):
    """As TRL documents them: `completion[0]["content"]`, and each prompt a list of messages."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat_model = tmp_path / "chat_model"
    shutil.copytree(reference_dir, chat_model)
    tokenizer.save_pretrained(chat_model)
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "2 + 3 ="}]}) + "\n")
    generate(generate_config(tmp_path / "gen", model_name_or_path=chat_model, prompts=prompts, num_samples=3))
    (tmp_path / "trl_reward.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    assert prompts[0][-1]['role'] == 'user', prompts\n"
        "    return [float(len(completion[0]['content'])) for completion in completions]\n"
    )
    spec = f"{tmp_path}/trl_reward.py:length_reward"
    scored_rows = score(ScoreConfig(input_dir=str(tmp_path / "gen"), output_dir=str(tmp_path / "s"), reward=[spec]))
    assert scored_rows["reward"] == [float(len(text)) for text in scored_rows["completion"]]


# --- reward models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A randomly initialized one-layer Llama sequence classifier (one label) with the toy word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = toy.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(toy.VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("models") / "tiny_rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def direct_scores(path, texts: list[str]) -> list[float]:
    """The classifier's logit for each text, one unpadded forward pass per text."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    scores = []
    with torch.no_grad():
        for text in texts:
            input_ids = torch.tensor([tokenizer(text)["input_ids"]])
            scores.append(float(model(input_ids=input_ids).logits[0, 0]))
    return scores


def test_reward_model_returns_the_classifier_logit_of_prompt_plus_completion(reward_model_dir):
    # Different lengths, so the batch is padded; "1" + "8" glues into the unknown word "18", so the texts must be
    # the plain concatenation prompt + completion, with no separator added.
    prompts = ["1 + 2 =", "9 + 9 = 1", "4 + 4 ="]
    completions = [" 3", "8", " 8 8 8"]
    expected = direct_scores(reward_model_dir, ["1 + 2 = 3", "9 + 9 = 18", "4 + 4 = 8 8 8"])
    assert len(set(expected)) == 3

    reward_model = RewardModel(str(reward_model_dir))
    assert reward_model(prompts, completions) == pytest.approx(expected, abs=1e-5)
    assert reward_model.__name__ == "tiny_rm"


def test_score_stage_with_a_reward_model(tmp_path, reward_model_dir):
    generated = tmp_path / "generated"
    generated_dataset().save_to_disk(str(generated))
    output = tmp_path / "scored"
    score(ScoreConfig(input_dir=str(generated), output_dir=str(output), reward_model=[str(reward_model_dir)]))

    columns = load_from_disk(str(output)).to_dict()
    expected = direct_scores(reward_model_dir, ["1 + 2 = 3", "1 + 2 = 4", "4 + 4 = 8"])
    assert columns["reward_tiny_rm"] == pytest.approx(expected, abs=1e-5)
    assert columns["reward"] == pytest.approx(expected, abs=1e-5)
    assert all(math.isfinite(value) for value in columns["reward"])


def test_reward_model_renders_chat_with_its_template_and_one_bos(tmp_path, reward_model_dir):
    """With `messages`, the reward model reads its own chat template, whose BOS must not be added a second time."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", 1)])
    tokenizer.chat_template = "<unk>{% for m in messages %}{{ m['content'] }} {% endfor %}"
    path = tmp_path / "chat_rm"
    LlamaForSequenceClassification.from_pretrained(reward_model_dir).save_pretrained(path)
    tokenizer.save_pretrained(path)

    messages = [[{"role": "user", "content": "1 + 2 ="}], [{"role": "user", "content": "4 + 4 ="}]]
    completions = ["3", "8 8"]
    rendered = ["<unk>1 + 2 = 3 ", "<unk>4 + 4 = 8 8 "]
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        expected = [
            float(model(input_ids=torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits[0, 0])
            for text in rendered
        ]
    assert tokenizer(rendered[0])["input_ids"][:2] == [1, 1]  # what a doubled BOS would have looked like
    conversational = [[{"role": "assistant", "content": text}] for text in completions]  # as TRL passes them
    assert RewardModel(str(path))(messages, conversational) == pytest.approx(expected, abs=1e-5)
