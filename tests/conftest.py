"""Shared fixtures: a tiny reference model trained once per session, saved like a Hub checkpoint, the toy prompts,
the stage configs most tests start from, stage folders built once, and toy diffusion pipelines."""

from __future__ import annotations

import functools
import json
import os
from collections import namedtuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REWARD = "rlfree.toy:arithmetic_reward"


@pytest.fixture(scope="session")
def save_toy_model(tmp_path_factory):
    """`save_toy_model(name, **build_kwargs)`: a toy model saved with save_pretrained, loaded as a Hub checkpoint."""
    from rlfree import toy

    def save(name: str, **build_kwargs):
        model, tokenizer = toy.build_reference_model(**build_kwargs)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save


@pytest.fixture(scope="session")
def reference_dir(save_toy_model):
    """The toy pi_ref, so every stage loads it through from_pretrained."""
    return save_toy_model("reference", seed=0)


@pytest.fixture(scope="session")
def tuned_dir(save_toy_model):
    """A second toy model, more often right: the 'tuned' side of the mix (any model serves to test the mixing)."""
    return save_toy_model("tuned", seed=1, correct_fraction=0.8)


@pytest.fixture(scope="session")
def write_toy_prompts(tmp_path_factory):
    """`write_toy_prompts(num_prompts, seed)`: a JSONL file of toy addition prompts, and its rows."""
    from rlfree import toy

    def write(num_prompts: int, seed: int):
        rows = toy.make_prompts(num_prompts, seed=seed)
        path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path, rows

    return write


@pytest.fixture(scope="session")
def prompts_file(write_toy_prompts):
    """Four addition prompts (with an `answer` column that must reach the reward as a kwarg)."""
    return write_toy_prompts(4, seed=1)[0]


@pytest.fixture
def long_prompts_file(tmp_path):
    """Three prompts; the middle one has 38 tokens, more than the toy model's 32 positions."""
    rows = [{"prompt": "1 + 2 ="}, {"prompt": " + ".join(["1"] * 19) + " ="}, {"prompt": "3 + 4 ="}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def exact_pair(reference_dir, tuned_dir, prompts_file) -> dict:
    """Every completion's exact log pi_ref, log pi_theta (tuned_dir) and reward, and how to index them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlfree import toy

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in (("ref", reference_dir), ("tuned", tuned_dir))}  # fmt: skip
    max_new_tokens = 3  # two answer digits + EOS: every completion is enumerable
    ref = toy.exact_distributions(models["ref"], tokenizer, prompts, max_new_tokens)
    tuned = toy.exact_distributions(models["tuned"], tokenizer, prompts, max_new_tokens)
    return {
        "completions": ref["completions"],
        "index": {tuple(c): i for i, c in enumerate(ref["completions"])},
        "ref": ref["logprobs"],
        "tuned": tuned["logprobs"],
        "rewards": ref["rewards"],
        "models": models,
        "tokenizer": tokenizer,
        "prompts": prompts,
    }


# --- stage settings --------------------------------------------------------------------------------------------------


def _paths_as_text(settings: dict) -> dict:
    return {key: str(value) if isinstance(value, os.PathLike) else value for key, value in settings.items()}


@pytest.fixture(scope="session")
def generate_config(reference_dir, prompts_file):
    """`generate_config(output_dir, **overrides)`: `rlfree generate`'s settings for the toy pi_ref on the four toy
    prompts with at most 3 new tokens (an answer's two digits and EOS); every other field is GenerateConfig's default
    unless overridden. Paths may be given as Path objects."""
    from rlfree.stages.generate import GenerateConfig

    def make(output_dir, **overrides):
        settings = {"model_name_or_path": reference_dir, "prompts": prompts_file, "output_dir": output_dir}
        return GenerateConfig(**_paths_as_text(settings | {"max_new_tokens": 3} | overrides))

    return make


@pytest.fixture(scope="session")
def sample_config(reference_dir, prompts_file):
    """`sample_config(output_dir, **overrides)`: `rlfree sample`'s settings for the toy pi_ref on the four toy prompts
    with at most 3 new tokens; the sampler, its reward and every other field come from the overrides or SampleConfig's
    defaults. Paths may be given as Path objects."""
    from rlfree.stages.sample import SampleConfig

    def make(output_dir, **overrides):
        settings = {"model_name_or_path": reference_dir, "prompts": prompts_file, "output_dir": output_dir}
        return SampleConfig(**_paths_as_text(settings | {"max_new_tokens": 3} | overrides))

    return make


@pytest.fixture(scope="session")
def pipeline_config():
    """`pipeline_config(pipeline, output_dir, prompts=None, **overrides)`: `rlfree generate`'s settings for a toy
    diffusion pipeline (prompts only for a conditional one), with 2 denoising steps unless overridden."""
    from rlfree.stages.generate import GenerateConfig

    def make(pipeline, output_dir, prompts=None, **overrides):
        settings = {"model_name_or_path": pipeline, "prompts": prompts, "output_dir": output_dir}
        return GenerateConfig(**_paths_as_text(settings | {"num_inference_steps": 2} | overrides))

    return make


@pytest.fixture(scope="session")
def shard_config(generate_config):
    """`shard_config(output_dir, **overrides)`: generate_config with 6 samples per prompt, seed 5, batches of 7 and one
    prompt per shard: a run of four shards to interrupt, resume and split across processes."""
    sharded = {"num_samples": 6, "seed": 5, "batch_size": 7, "shard_size": 1}
    return lambda output_dir, **overrides: generate_config(output_dir, **sharded | overrides)


@pytest.fixture(scope="session")
def sample_score_weight():
    """`sample_score_weight(root, model, prompts, reward, beta, **generate_settings)`: generate (prompts may be None for
    an unconditional pipeline) → score with one reward function → weight (rlhf at `beta`), into root/gen,
    root/scored and root/weighted; returns the weighted dataset."""
    from rlfree.stages.generate import GenerateConfig, generate
    from rlfree.stages.score import ScoreConfig, score
    from rlfree.stages.weight import WeightConfig, weight

    def run(root, model, prompts, reward: str, beta: float, **generate_settings):
        generate(GenerateConfig(str(model), prompts and str(prompts), str(root / "gen"), **generate_settings))
        score(ScoreConfig(reward=[reward], input_dir=str(root / "gen"), output_dir=str(root / "scored")))
        return weight(WeightConfig(str(root / "scored"), str(root / "weighted"), "rlhf", beta=beta))

    return run


@pytest.fixture(scope="session")
def toy_recipe(reference_dir, prompts_file):
    """`toy_recipe(path, **weight_settings)`: path/recipe.yaml driving generate → score → weight → train on the toy into
    out/ (seed 3, 8 samples per prompt, beta 0.5 unless weight_settings say otherwise; None drops a key)."""

    def write(path, **weight_settings) -> str:
        weight = {"input_dir": "out/scored", "output_dir": "out/weighted", "beta": 0.5} | weight_settings
        recipe = {
            "seed": 3,
            "generate": {
                "model_name_or_path": str(reference_dir),
                "prompts": str(prompts_file),
                "num_samples": 8,
                "max_new_tokens": 3,
                "output_dir": "out/generated",
            },
            "score": {"input_dir": "out/generated", "reward": REWARD, "output_dir": "out/scored"},
            "weight": {key: value for key, value in weight.items() if value is not None},
            "train": {
                "model_name_or_path": str(reference_dir),
                "dataset_dir": "out/weighted",
                "output_dir": "out/model",
                "max_steps": 2,
                "per_device_train_batch_size": 8,
                "learning_rate": 0.01,
                "report_to": "none",
                "disable_tqdm": True,
            },
        }
        (path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
        return str(path / "recipe.yaml")

    return write


# --- toy stage folders, made once and only read ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def generated(generate_config, tmp_path_factory):
    """A generate stage of 4 prompts x 4 samples."""
    from rlfree.stages.generate import generate

    path = tmp_path_factory.mktemp("stages") / "generated"
    generate(generate_config(path, num_samples=4))
    return path


@pytest.fixture(scope="session")
def scored(generated, tmp_path_factory):
    from rlfree.stages.score import ScoreConfig, score

    path = tmp_path_factory.mktemp("stages") / "scored"
    score(ScoreConfig(input_dir=str(generated), output_dir=str(path), reward=[REWARD]))
    return path


@pytest.fixture(scope="session")
def weighted(scored, tmp_path_factory):
    from rlfree.stages.weight import WeightConfig, weight

    path = tmp_path_factory.mktemp("stages") / "weighted"
    weight(WeightConfig(str(scored), str(path), "rlhf", beta=0.5))
    return path


# --- the command line ------------------------------------------------------------------------------------------------

CliResult = namedtuple("CliResult", "code out err")


@pytest.fixture
def run_cli(capsys):
    """`run_cli(argv)`: `rlfree ARGV` in-process (arguments turned into text): its exit code (0 when it returns) and
    what it printed, as (code, out, err)."""
    from rlfree.cli import main

    def run(argv: list) -> CliResult:
        try:
            main([str(arg) for arg in argv])
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


# --- toy diffusion pipelines -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def random_pipeline(tmp_path_factory):
    """An untrained unconditional pipeline: enough to check what the stages do with its samples."""
    from rlfree.diffusion import toy

    folder = tmp_path_factory.mktemp("random_pipeline")
    toy.build_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def class_pipeline(tmp_path_factory):
    from rlfree.diffusion import toy

    folder = tmp_path_factory.mktemp("class_pipeline")
    toy.build_pipeline(folder, num_class_embeds=2)
    return folder


@pytest.fixture(scope="session")
def class_weighted(tmp_path_factory, sample_score_weight):
    """A class-conditional toy pipeline (root/base) and 64 weighted samples of it (2 classes x 32, root/weighted)."""
    from rlfree.diffusion import toy

    root = tmp_path_factory.mktemp("diffusion_distributed")
    toy.build_pipeline(root / "base", num_class_embeds=2)
    (root / "classes.jsonl").write_text('{"prompt": "0"}\n{"prompt": "1"}\n')
    reward = "rlfree.diffusion.toy:plus_component_reward"
    sample_score_weight(
        root, root / "base", root / "classes.jsonl", reward, 0.5, num_samples=32, num_inference_steps=2
    )
    return root


@pytest.fixture(scope="session")
def text_pipeline(tmp_path_factory):
    """A text-to-image pipeline in StableDiffusionPipeline's layout: VAE latents, a CLIP text encoder."""
    from rlfree.diffusion import tiny

    folder = tmp_path_factory.mktemp("text_pipeline")
    tiny.build("sd", folder)
    return folder


@pytest.fixture(scope="session")
def text_prompts(tmp_path_factory):
    """helpers.TEXT_PROMPTS as a prompt file."""
    from tests.helpers import TEXT_PROMPTS

    path = tmp_path_factory.mktemp("text_prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in TEXT_PROMPTS))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """`tiny_pipeline(kind)`: the folder of a tiny random pipeline of `rlfree.diffusion.tiny.BUILDERS[kind]` (sd, sdxl,
    sd3, flux), built once per session."""
    from rlfree.diffusion import tiny

    @functools.cache
    def build(kind: str):
        folder = tmp_path_factory.mktemp(f"tiny_{kind}")
        tiny.build(kind, folder)
        return folder

    return build
