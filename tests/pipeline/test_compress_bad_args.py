"""compress_run refuses wrongly typed arguments before loading anything."""

from __future__ import annotations

import pytest

from slimtorch.pipeline import compress_run


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"method_options": "x"}, TypeError, "method_options must be a dict"),
        (
            {"finetune": {"epochs": 1}},
            TypeError,
            "finetune must be a TrainConfig or None, got dict",
        ),
        ({"profiles": "rx580"}, TypeError, "got the string 'rx580'"),
        ({"device": "gpu"}, ValueError, r"invalid device 'gpu'"),
        ({"seed": "3"}, ValueError, r"seed must be an int or None, got '3'"),
    ],
)
def test_bad_argument_is_refused_by_name(tmp_path, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        compress_run(in_dir=tmp_path / "missing", out_dir=None, method="prune", **kwargs)
