"""The trainer integrations are optional: importing anyorder.integrations loads neither the
Hugging Face Trainer nor Lightning; their names resolve on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_importing_integrations_loads_no_trainer_stack() -> None:
    code = (
        "import json, sys, anyorder.integrations as i; "
        "print(json.dumps([m for m in ('transformers.trainer', 'accelerate', 'lightning') "
        "if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300).stdout  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_names_resolve_on_first_use() -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("accelerate")
    import anyorder.integrations as i
    from anyorder.integrations.hf_trainer import ClosureTrainer
    from anyorder.integrations.lightning import ClosureOptimizationCheck, closure_step

    assert i.ClosureTrainer is ClosureTrainer
    assert i.closure_step is closure_step and i.ClosureOptimizationCheck is ClosureOptimizationCheck
    with pytest.raises(AttributeError):
        i.no_such_name  # noqa: B018
