"""The command line (`rlfree.cli`): exit codes, one-line errors on stderr, messages printed once per
`accelerate launch` job, a fast `--help`, and the real `python -m rlfree`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset, load_from_disk

import rlfree.data
from rlfree.cli import main
from tests.helpers import REPO_ROOT, generate_args, nothing_made, one_line_error, scored_dataset

REWARD = "rlfree.toy:arithmetic_reward"


# The real `python -m rlfree weight` run pays several seconds of imports, so it starts in the background when this
# module starts and the test at the bottom of the file collects its result. (The failing call is checked in-process
# through `main`, the same entry point, to keep the suite fast on a busy machine.)


class CliRun:
    def __init__(self, root: Path, process: subprocess.Popen):
        self.root, self.process, self._result = root, process, None

    def result(self) -> tuple[int, str, str]:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=120)
            self._result = (self.process.returncode, stdout, stderr)
        return self._result


def tiny_scored_dataset() -> Dataset:
    """Three samples of one prompt, rewards 1, 0, 0, proposal = pi_ref: with beta = 0.5, log w = 2, 0, 0."""
    return Dataset.from_dict(
        {
            "prompt": ["1 + 2 ="] * 3,
            "completion": [" 3", " 4", " 5"],
            "prompt_index": [0, 0, 0],
            "ref_logprob": [-1.0, -2.0, -3.0],
            "proposal_logprob": [-1.0, -2.0, -3.0],
            "num_tokens": [2, 2, 2],
            "reward": [1.0, 0.0, 0.0],
        }
    )


@pytest.fixture(scope="module", autouse=True)
def cli_run(request, tmp_path_factory):
    if not any("cli_run" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield None  # no selected test needs the subprocess
        return
    root = tmp_path_factory.mktemp("cli")
    tiny_scored_dataset().save_to_disk(str(root / "scored"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "rlfree", "weight", "--input_dir", str(root / "scored")]
    command += ["--weighting", "rlhf", "--beta", "0.5", "--output_dir", str(root / "weighted")]
    process = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield CliRun(root, process)
    if process.poll() is None:
        process.kill()
        process.communicate()


# --- main(): exit codes and one-line errors --------------------------------------------------------------------------


def test_main_reports_a_stage_input_error_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["weight", "--input_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), "--beta", "1"])
    assert exit_info.value.code == 2
    assert "rlfree weight: error: --input_dir" in capsys.readouterr().err


def test_main_rejects_an_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_main_rejects_an_unknown_flag_with_exit_code_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["weight", "--input_dir", "i", "--output_dir", "o", "--beta", "1", "--betta", "2"])
    assert exit_info.value.code == 2


def test_weight_with_negative_beta_exits_2_naming_the_flag(tmp_path, capsys):
    tiny_scored_dataset().save_to_disk(str(tmp_path / "scored"))
    argv = ["weight", "--input_dir", str(tmp_path / "scored"), "--output_dir", str(tmp_path / "never")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--weighting", "rlhf", "--beta", "-1"])
    assert exit_info.value.code == 2
    assert "rlfree weight: error: --weighting rlhf needs --beta > 0 (or --target_kl / --target_ess), got -1.0" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "never").exists()


# --- a fast `--help`, and messages printed once per `accelerate launch` job ------------------------------------------


def test_help_imports_no_torch_transformers_or_datasets():
    code = (
        "import rlfree.cli, sys; rlfree.cli.main(['--help']); "
        "print('torch' in sys.modules, 'transformers' in sys.modules, 'datasets' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: rlfree <command>" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False False False"


def test_inspect_help_shows_the_positional_form(run_cli):
    code, out, _ = run_cli(["inspect", "--help"])
    assert code == 0
    assert out.startswith("usage: rlfree inspect DIR [flags]")


def test_stage_message_is_printed_by_the_main_process_only(tmp_path, monkeypatch, run_cli):
    scored_dataset().save_to_disk(str(tmp_path / "scored"))
    argv = ["weight", "--input_dir", str(tmp_path / "scored"), "--beta", "0.5", "--output_dir"]
    code, out, err = run_cli(argv + [str(tmp_path / "main")])
    assert code == 0, err
    assert out.count("wrote weights to") == 1
    # Another process of the job: the stage itself still runs (here, alone), but the CLI stays quiet.
    monkeypatch.setattr(rlfree.data, "process_state", lambda: SimpleNamespace(is_main_process=False))
    code, out, err = run_cli(argv + [str(tmp_path / "other")])
    assert code == 0, err
    assert (tmp_path / "other").is_dir()
    assert "wrote weights to" not in out


# --- bad input of every kind: one line naming it, nothing created ----------------------------------------------------


def write(path, content: str | bytes):
    """Write `content` to `path` and return the path."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def reward_spec(path, source: str) -> str:
    """`path:f` for a reward file holding `source`."""
    return f"{write(path, source)}:f"


def recipe(folder, reference_dir, prompts_file, **overrides) -> str:
    sections = {
        "model_name_or_path": str(reference_dir), "prompts": str(prompts_file), "num_samples": 2,
        "max_new_tokens": 3, "output_dir": str(folder / "out"),
    } | overrides  # fmt: skip
    return str(write(folder / "recipe.yaml", "generate:\n" + "".join(f"  {k}: {v}\n" for k, v in sections.items())))


# (command, what the error says, the arguments) for inputs that answered with a traceback, no message or wrong advice.
# `t` holds the test's folder and fixtures; every case must leave `t.out` (and its .partial) uncreated.
BAD_INPUTS = {
    "non-UTF-8 prompt file": (
        "generate", "line 1 is not UTF-8 text (byte 0xe9",
        lambda t: generate_args(t.reference, write(t.tmp / "p.jsonl", b'{"prompt": "caf\xe9 1 + 2 ="}\n'), t.out),
    ),
    "score --batch_size 0": (
        "score", "--batch_size must be >= 1, got 0",
        lambda t: ["score", "--input_dir", t.generated, "--reward", REWARD, "--output_dir", t.out, "--batch_size", 0],
    ),
    "train --learning_rate -1": (
        "train", "--learning_rate must be >= 0, got -1.0",
        lambda t: ["train", "--model_name_or_path", t.reference, "--dataset_dir", t.weighted, "--output_dir", t.out,
                   "--learning_rate", -1],
    ),
    "train --gradient_accumulation_steps 0": (
        "train", "--gradient_accumulation_steps must be >= 1",
        lambda t: ["train", "--model_name_or_path", t.reference, "--dataset_dir", t.weighted, "--output_dir", t.out,
                   "--gradient_accumulation_steps", 0],
    ),
    "inspect --output_dir onto a file": (
        "inspect", "is an existing file",
        lambda t: ["inspect", t.weighted, "--output_dir", write(t.tmp / "report.txt", "mine")],
    ),
    "recipe value of the wrong type": (
        "generate", "num_samples must be an integer, got 16.7",
        lambda t: ["generate", "--config", recipe(t.tmp, t.reference, t.prompts, num_samples=16.7)],
    ),
    "recipe value outside the choices": (
        "generate", "backend must be one of hf, vllm, got 'tgi'",
        lambda t: ["generate", "--config", recipe(t.tmp, t.reference, t.prompts, backend="tgi")],
    ),
    "broken YAML": (
        "generate", "not valid YAML at line 3",
        lambda t: ["generate", "--config", write(t.tmp / "r.yaml", "generate:\n  num_samples: 2\n   prompts: [x\n")],
    ),
    "reward file with a syntax error": (
        "score", "importing",
        lambda t: ["score", "--input_dir", t.generated, "--output_dir", t.out,
                   "--reward", reward_spec(t.tmp / "bad.py", "def f(prompts, completions):\n    return [1.0\n")],
    ),
    "reward file that fails when imported": (
        "score", "raised ModuleNotFoundError: No module named 'not_installed'",
        lambda t: ["score", "--input_dir", t.generated, "--output_dir", t.out,
                   "--reward", reward_spec(t.tmp / "bad.py", "import not_installed\n")],
    ),
    "demo --num_prompts 1000": (
        "demo", "--num_prompts must be in 1..100",
        lambda t: ["demo", "--num_prompts", 1000, "--output_dir", t.out],
    ),
    "a billion samples of 4 prompts": (
        "generate", "--num_samples 1000000000: the samples of one prompt take about",
        lambda t: generate_args(t.reference, t.prompts, t.out, "--num_samples", 1_000_000_000),
    ),
    "inspect on a missing path": (
        "inspect", "--input_dir", lambda t: ["inspect", t.tmp / "nowhere", "--output_dir", t.out],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_one_line_naming_the_input_and_create_nothing(
    case, reference_dir, prompts_file, generated, weighted, tmp_path, run_cli
):
    from types import SimpleNamespace

    command, message, arguments = BAD_INPUTS[case]
    paths = SimpleNamespace(
        tmp=tmp_path, out=tmp_path / "out", reference=reference_dir, prompts=prompts_file, generated=generated,
        weighted=weighted,
    )  # fmt: skip
    code, _, err = run_cli(arguments(paths))
    assert one_line_error(code, err, command), err
    assert message in err and nothing_made(paths.out)
    if case == "reward file with a syntax error":
        assert "'[' was never closed (at" in err and "bad.py:2)" in err
    if case == "inspect on a missing path":
        assert "nowhere: no such folder" in err


# --- the real command (started in the background when this module starts) --------------------------------------------


def test_python_m_rlfree_weight_exits_0_and_writes_the_weighted_dataset(cli_run):
    returncode, stdout, stderr = cli_run.result()
    assert returncode == 0, stderr
    output = cli_run.root / "weighted"
    weights = load_from_disk(str(output)).to_dict()["weight"]
    e2 = math.exp(2)  # r / beta = 2, 0, 0
    assert weights == pytest.approx([e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)], rel=1e-12)
    assert json.loads((output / "weighting.json").read_text())["beta"] == 0.5
    assert "ESS" in stdout
    assert f"wrote weights to {output}" in stdout
