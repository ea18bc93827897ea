"""Training settings and the model card (`rlfree.training`)."""

from __future__ import annotations

import pytest
from transformers import TrainingArguments

from rlfree.lm.trainer import language_model_card
from rlfree.training import model_card


def test_non_finite_learning_rate_is_refused_before_the_output_folder_is_made(
    reference_dir, scored, tmp_path, run_cli
):
    out = tmp_path / "model"
    argv = ["train", "--model_name_or_path", reference_dir, "--dataset_dir", scored, "--output_dir", out]
    code, _, err = run_cli([*argv, "--learning_rate", "nan"])
    assert code == 2 and "--learning_rate must be a finite number" in err and not out.exists()


def _card(tmp_path, name_or_path, weighting=None):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    sidecars = {"weighting": weighting or {"weighting": "rlhf", "beta": 0.1}}
    return model_card(name_or_path, sidecars, "data", args, language_model_card({}))


def test_model_card_names_a_hub_id_but_not_a_local_folder(tmp_path, monkeypatch):
    card = _card(tmp_path, "my-org/my-model")
    assert 'base_model: "my-org/my-model"' in card and "| base model | my-org/my-model |" in card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-org" / "local-model").mkdir(parents=True)
    card = _card(tmp_path, "my-org/local-model")  # as typed: relative, and shaped like a Hub id
    assert "base_model:" not in card
    assert f"| base model | {tmp_path.resolve() / 'my-org' / 'local-model'} |" in card

    snapshot = tmp_path / "hub" / "models--my-org--cached-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    card = _card(tmp_path, str(snapshot))
    assert 'base_model: "my-org/cached-model"' in card and "| base model | my-org/cached-model |" in card


UNSET = {"beta": None, "rlif_exponent": None, "beta_if": None}  # `weighting.json` records every setting


@pytest.mark.parametrize(
    ("weighting", "shown", "hidden"),
    [
        (UNSET | {"weighting": "rlhf", "beta": 0.37}, ["| beta | 0.37 |"], ["| rlif exponent |", "| rlif beta_if |"]),
        (UNSET | {"weighting": "rlif", "rlif_exponent": 0.5}, ["| rlif exponent | 0.5 |"], ["| beta |", "beta_if"]),
        (UNSET | {"weighting": "rlif", "beta_if": 0.2}, ["| rlif beta_if | 0.2 |"], ["| beta |", "exponent"]),
        (
            UNSET | {"weighting": "rlhf+rlif", "beta": 0.37, "rlif_exponent": 0.5},
            ["| beta | 0.37 |", "| rlif exponent | 0.5 |"],
            ["beta_if"],
        ),
    ],
)
def test_model_card_shows_only_the_coefficients_of_the_weighting_used(tmp_path, weighting, shown, hidden):
    card = _card(tmp_path, "my-org/my-model", weighting)
    for row in shown:
        assert row in card, row
    for text in hidden:
        assert text not in card, text


def test_model_card_rounds_ess_and_names_rlfree_without_a_registry_link(tmp_path):
    weighting = {"weighting": "rlhf", "beta": 0.1, "ess_min": 1.2345678901, "ess_median": 12345.678}
    card = _card(tmp_path, "my-org/my-model", weighting)
    assert "| ESS min / median | 1.23 / 12300 |" in card
    assert "pypi" not in card and "with rlfree:" in card
