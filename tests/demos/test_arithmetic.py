"""`rlfree demo` on the arithmetic task."""

from __future__ import annotations

from datasets import Dataset

from tests.helpers import one_line_error


def test_a_demo_over_one_with_other_settings_stops_before_changing_anything(tmp_path, run_cli):
    """Step 1 rewrites the reference and the prompts: it must not run when step 2 would refuse its folder."""
    from dataclasses import asdict

    from rlfree.data import save_stage
    from rlfree.demos import DemoConfig
    from rlfree.demos.arithmetic import stage_configs
    from rlfree.stages.checks import check_outputs

    out = tmp_path / "demo"
    stages = stage_configs(DemoConfig(output_dir=str(out), seed=0), out)
    (generation,) = stages["generate"]
    save_stage(Dataset.from_list([{"prompt": "1 + 2 ="}]), generation.output_dir, "generation", asdict(generation))
    (out / "prompts.jsonl").write_text("the first run's prompts\n")
    check_outputs(stages.values())  # the same settings go on
    code, _, err = run_cli(["demo", "--seed", 1, "--output_dir", out])
    assert one_line_error(code, err, "demo") and "seed: 0 -> 1" in err
    assert (out / "prompts.jsonl").read_text() == "the first run's prompts\n" and not (out / "reference").exists()
