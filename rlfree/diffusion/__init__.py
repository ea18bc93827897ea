"""Diffusion models: the same stages on diffusers pipelines (anthology §3).

A `--model_name_or_path` that holds `model_index.json` is a diffusers pipeline and selects this family
(`rlfree.diffusion.family`). Samples are drawn from the base pipeline with per-sample seeds, scored by reward functions
that see each image as `pipeline(output_type="np")` returns it, weighted by exp(r/beta) self-normalized per condition
(the same weighting as for LMs), and the denoiser is trained on the *weighted* denoising loss, whose optimum is
p_base(x|c)·exp(r/beta)/Z.
"""
