"""A step with a non-finite gradient is refused as a whole: nothing changes.

One NaN or inf element makes the mean of v of its whole tensor non-finite, and with it
every element's step; SoftAdam therefore checks every gradient before it writes
anything, and by default raises an error that names the parameter (nonfinite="raise"),
or skips the step (nonfinite="skip") for wrappers that handle overflow themselves.
"""

from __future__ import annotations

import copy

import pytest
import torch

from softadam_nlp import SoftAdam

EXECUTIONS = {"per-tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def two_layer_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def backward(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(5, 8, generator=g)).pow(2).mean().backward()


def snapshot(model: torch.nn.Module, optimizer: SoftAdam) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_unchanged(before: tuple[dict, dict], model: torch.nn.Module, optimizer: SoftAdam) -> None:
    params, state = before
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), name
    now = optimizer.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            assert torch.equal(now["state"][index][key], value), (index, key)


@pytest.mark.parametrize("execution", list(EXECUTIONS))
@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), -float("inf"), 1e30], ids=["nan", "inf", "-inf", "overflow"]
)
@pytest.mark.parametrize("steps_before", [0, 3], ids=["first-step", "later-step"])
def test_a_nonfinite_gradient_raises_and_changes_nothing(execution: str, bad: float, steps_before: int) -> None:
    model = two_layer_model()
    optimizer = SoftAdam(model.named_parameters(), lr=0.1, **EXECUTIONS[execution])
    for seed in range(steps_before):
        backward(model, seed)
        optimizer.step()
    before = snapshot(model, optimizer)
    backward(model, 99)
    model[2].weight.grad[1, 2] = bad  # the last tensor: every other one is checked first
    with pytest.raises(ValueError, match=r"gradient of parameter '2\.weight' \(shape \(3, 6\)\) is not finite"):
        optimizer.step()
    assert_unchanged(before, model, optimizer)
    # the next finite step goes ahead as usual
    backward(model, 100)
    optimizer.step()
    assert not torch.equal(model[0].weight, before[0]["0.weight"])


def test_unnamed_parameters_are_named_by_group_and_position() -> None:
    model = two_layer_model()
    optimizer = SoftAdam([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.01}])
    backward(model, 0)
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter 1 of param group 1 \(shape \(3,\)\)"):
        optimizer.step()


def test_the_step_is_atomic_across_parameter_groups() -> None:
    # Group 0 is finite and comes first; it must not be stepped when group 1 is refused.
    model = two_layer_model()
    optimizer = SoftAdam([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}])
    before = snapshot(model, optimizer)
    backward(model, 0)
    model[2].weight.grad.fill_(float("inf"))
    with pytest.raises(ValueError):
        optimizer.step()
    assert_unchanged(before, model, optimizer)
    assert optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("execution", list(EXECUTIONS))
def test_skip_leaves_everything_as_it_was_and_counts(execution: str) -> None:
    model = two_layer_model()
    optimizer = SoftAdam(model.parameters(), lr=0.1, nonfinite="skip", **EXECUTIONS[execution])
    reference_model = two_layer_model()
    reference = SoftAdam(reference_model.parameters(), lr=0.1, **EXECUTIONS[execution])
    for seed in range(6):
        for m, opt in ((model, optimizer), (reference_model, reference)):
            backward(m, seed)
            if seed in (0, 3) and m is model:  # two bad steps the reference never takes
                m[0].bias.grad[2] = float("nan")
            if seed not in (0, 3) or m is model:
                opt.step()
    assert optimizer.skipped_steps == 2 and reference.skipped_steps == 0
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)
    assert optimizer.state[next(model.parameters())]["step"].item() == 4


def test_a_group_that_raises_wins_over_one_that_skips() -> None:
    model = two_layer_model()
    optimizer = SoftAdam(
        [{"params": list(model[0].parameters()), "nonfinite": "skip"}, {"params": list(model[2].parameters())}]
    )
    backward(model, 0)
    model[0].weight.grad[0, 0] = float("nan")
    assert optimizer.step() is None and optimizer.skipped_steps == 1  # only the skipping group is bad
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="param group 1"):
        optimizer.step()


def test_invalid_nonfinite_is_refused() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid nonfinite='ignore'"):
        SoftAdam([w], nonfinite="ignore")
    with pytest.raises(ValueError, match="Invalid nonfinite=None"):
        SoftAdam([{"params": [w], "nonfinite": None}])


def test_grad_scaler_skips_overflowing_steps_with_softadam() -> None:
    # torch.amp.GradScaler unscales the gradients, skips optimizer.step() when any is not
    # finite, and lowers its scale. With SoftAdam (default nonfinite="raise") the skipped
    # step must leave no trace, and the next one must equal an unscaled SoftAdam step.
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    optimizer = SoftAdam([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-10, growth_interval=1000)
    reference_w = torch.nn.Parameter(w.detach().clone())
    reference = SoftAdam([reference_w], lr=0.1)
    initial = w.detach().clone()
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale((w * 4.0).sum()).backward()  # gradient 4 * 2^127: inf in float32 at the first scale
        scaler.step(optimizer)
        scaler.update()
        if step == 0:
            assert torch.equal(w.detach(), initial) and optimizer.state[w] == {}
            assert scaler.get_scale() == 2.0**117
        else:
            reference.zero_grad()
            (reference_w * 4.0).sum().backward()
            reference.step()
            assert torch.allclose(w, reference_w, rtol=1e-6, atol=0)
    assert optimizer.state[w]["step"].item() == 2 and optimizer.skipped_steps == 0
