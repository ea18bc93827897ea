"""The command registry (`rlfree.commands`): every command has help, and an optional extra that is not installed
is named with install advice that works from a checkout."""

from __future__ import annotations

import sys

import pytest

from rlfree.cli import main
from rlfree.commands import command_types
from rlfree.errors import StageInputError
from rlfree.recipe import parse_command
from tests.helpers import RECIPES, REPO_ROOT


def test_without_trl_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    monkeypatch.delitem(sys.modules, "rlfree.baselines.rloo", raising=False)
    with pytest.raises(StageInputError, match=r"pip install -e '\.\[baselines\]'"):
        command_types("baseline")
    # Other commands still read recipes whose top-level keys only the baseline knows.
    (config,) = parse_command(
        "weight",
        command_types("weight"),
        ["--config", str(RECIPES / "toy_rloo.yaml"), "--input_dir", "x", "--output_dir", "y"],
    )
    assert config.beta == 0.5


@pytest.mark.parametrize(
    "command", ["generate", "score", "weight", "train", "run", "inspect", "sample", "evaluate", "ab", "demo"]
)
def test_every_command_has_help(command, capsys):
    from rlfree.commands import COMMANDS

    assert command in COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: rlfree {command}" in capsys.readouterr().out


def test_install_advice_is_for_a_checkout_since_rlfree_is_on_no_package_index(monkeypatch, run_cli):
    for page in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]:
        assert "pip install 'rlfree[" not in page.read_text(), page
    monkeypatch.setitem(sys.modules, "trl", None)  # TRL missing: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "rlfree.baselines", raising=False)
    monkeypatch.delitem(sys.modules, "rlfree.baselines.rloo", raising=False)  # imported by an earlier test
    code, out, err = run_cli(["baseline", "--help"])
    assert code == 2
    assert "`rlfree baseline` needs TRL" in err
    assert "pip install -e '.[baselines]'" in err
    assert "pip install -e '.[baselines]'" in run_cli(["--help"])[1]
