"""Inputs that carry code never run it: specs are YAML data, checkpoints load with weights_only=True.
(The Ray side, credentials in logs and loopback-only listening, is in test_sweep.py.)"""

from __future__ import annotations

import os

import pytest
import torch

from lrt_model import checkpoint as ckpt
from lrt_platform.spec import SpecError, load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_spec_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    with open(f"{ROOT}/sweep_specs/tiny/quickstart.yaml") as f:
        text = f.read()
    spec = tmp_path / "evil.yaml"
    spec.write_text(text.replace("experiment: quickstart_tiny",
                                 f"experiment: !!python/object/apply:os.system ['touch {marker}']"))
    with pytest.raises(SpecError) as e:
        load_spec(str(spec))
    assert not marker.exists() and "\n" not in str(e.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "model": _Payload(marker)}, tmp_path / "latest.pt")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(str(tmp_path))
    assert not marker.exists() and "latest.pt is damaged" in str(e.value)
