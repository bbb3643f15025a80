"""The training scripts' process-wide settings (softadam_nlp/experiments/runtime.py)."""

import torch

from softadam_nlp.experiments.runtime import flush_denormals

SUBNORMAL = 1e-40  # below float32's smallest normal, 1.18e-38


def test_subnormals_flush_to_zero_inside_the_block_only() -> None:
    x = torch.tensor([SUBNORMAL, 1.0])
    assert (x * 1.0)[0] > 0  # torch's default keeps subnormals
    with flush_denormals() as supported:
        assert supported  # every x86-64 CPU has FTZ/DAZ
        assert (x * 1.0).tolist() == [0.0, 1.0]
    assert (x * 1.0)[0] > 0  # restored on exit


def test_the_setting_is_restored_when_training_raises() -> None:
    try:
        with flush_denormals():
            raise RuntimeError("a run that crashed")
    except RuntimeError:
        pass
    assert (torch.tensor([SUBNORMAL]) * 1.0)[0] > 0
