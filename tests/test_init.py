"""The package's public names (`rlfree/__init__.py`), imported lazily."""

from __future__ import annotations

import pytest

from rlfree.stages.weight import WeightConfig


def test_public_names_still_import_from_the_package():
    import rlfree
    from rlfree import WeightConfig as PublicWeightConfig
    from rlfree import inspect_stage, weight
    from rlfree.evaluation.inspection import inspect
    from rlfree.stages.weight import weight as weight_stage

    assert (PublicWeightConfig, weight, inspect_stage) == (WeightConfig, weight_stage, inspect)
    assert set(rlfree.__all__) <= set(dir(rlfree))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rlfree.nope  # noqa: B018
