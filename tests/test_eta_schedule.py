"""softadam_nlp.eta_schedule: schedules on SoftAdam's eta."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from softadam_nlp import SoftAdam
from softadam_nlp.eta_schedule import EtaScheduler, WithEtaSchedule, eta_at


def optimizer(eta: float = 1.0, **kwargs) -> tuple[list[torch.nn.Parameter], SoftAdam]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    return params, SoftAdam(params, lr=0.05, eta=eta, **kwargs)


def trajectory(scheduler: EtaScheduler, steps: int) -> list[float]:
    """Eta used by steps 1..steps (set after construction, then after each step)."""
    etas = []
    for _ in range(steps):
        etas.append(scheduler.get_last_eta()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return etas


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", {0: 2.0, 5: 2.0, 12: 2.0}),
        ("linear", {0: 2.0, 5: 1.0, 10: 0.0, 12: 0.0}),
        ("cosine", {0: 2.0, 5: 1.0, 10: 0.0, 12: 0.0}),
    ],
)
def test_trajectories_at_chosen_steps(schedule: str, expected: dict[int, float]) -> None:
    params, opt = optimizer(eta=2.0)
    for p in params:
        p.grad = torch.ones_like(p)
    etas = trajectory(EtaScheduler(opt, schedule, eta_end=0.0, total_steps=10), 13)
    for step, eta in expected.items():
        assert etas[step] == pytest.approx(eta, abs=1e-12)
    if schedule == "cosine":  # slower than linear at the start, faster in the middle
        assert etas[2] == pytest.approx(1 + math.cos(math.pi * 0.2)) and etas[2] > 2.0 - 0.4


def test_step_schedule_and_small_to_large() -> None:
    assert [eta_at(t, "steps", 0.1, milestones=[3, 6], etas=[1.0, 4.0]) for t in range(8)] == [
        0.1,
        0.1,
        0.1,
        1.0,
        1.0,
        1.0,
        4.0,
        4.0,
    ]
    assert eta_at(4, "linear", 0.0, 4.0, total_steps=8) == 2.0  # SGD-like first, Adam-like later


def test_each_group_has_its_own_start_and_end() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SoftAdam([{"params": [a], "eta": 4.0}, {"params": [b], "eta": 1.0}], lr=0.1)
    scheduler = EtaScheduler(opt, "linear", eta_end=[0.0, 3.0], total_steps=4)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert scheduler.get_last_eta() == [2.0, 2.0]
    assert [g["initial_eta"] for g in opt.param_groups] == [4.0, 1.0]


def test_runs_beside_an_lr_scheduler_and_as_one_scheduler() -> None:
    params, opt = optimizer()
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 10)
    both = WithEtaSchedule(lr, EtaScheduler(opt, "linear", eta_end=0.0, total_steps=10))
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(4):
        opt.step()
        both.step()
    assert both.get_last_lr() == pytest.approx([0.05 * 0.6])
    assert both.get_last_eta() == pytest.approx([0.6]) and both.last_epoch == 4
    assert both.base_lrs == [0.05]  # the rest is the lr scheduler's
    clone = copy.deepcopy(both)
    assert clone.state_dict()["eta"]["last_epoch"] == 4


def test_resume_continues_the_trajectory_and_the_training() -> None:
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(5, 3, generator=g), torch.randn(3, generator=g)] for _ in range(12)]

    def train(params, opt, scheduler, steps) -> list[float]:
        etas = []
        for step_grads in steps:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            etas.append(opt.param_groups[0]["eta"])
            opt.step()
            scheduler.step()
        return etas

    params, opt = optimizer(eta=3.0)
    straight = train(params, opt, EtaScheduler(opt, "cosine", eta_end=0.0, total_steps=10), grads)

    first_params, first = optimizer(eta=3.0)
    first_scheduler = EtaScheduler(first, "cosine", eta_end=0.0, total_steps=10)
    before = train(first_params, first, first_scheduler, grads[:5])
    saved = copy.deepcopy((first.state_dict(), first_scheduler.state_dict()))
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    resumed = SoftAdam(resumed_params, lr=0.05, eta=3.0)
    resumed.load_state_dict(saved[0])  # brings initial_eta back with the param groups
    scheduler = EtaScheduler(resumed, "cosine", eta_end=0.0, total_steps=10, last_epoch=4)
    scheduler.load_state_dict(saved[1])
    after = train(resumed_params, resumed, scheduler, grads[5:])
    assert before + after == straight
    for p, q in zip(resumed_params, params):
        assert torch.equal(p, q)


def test_eta_zero_at_the_end_makes_sgd_steps() -> None:
    params, opt = optimizer(eta=2.0, betas=(0.9, 0.999))
    scheduler = EtaScheduler(opt, "linear", eta_end=0.0, total_steps=3)
    g = torch.Generator().manual_seed(2)
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        before = [p.detach().clone() for p in params]
        momentum = [opt.state[p]["exp_avg"].clone() if p in opt.state else torch.zeros_like(p) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
        scheduler.step()
        if step >= 3:  # eta is 0 from the fourth step on: p -= lr * m, m = 0.9 m + 0.1 g
            for p, old, m, grad in zip(params, before, momentum, grads):
                torch.testing.assert_close(p.detach(), old - 0.05 * (0.9 * m + 0.1 * grad), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="exponential"), "unknown eta schedule 'exponential'"),
        (dict(schedule="linear", total_steps=10), "needs eta_end >= 0"),
        (dict(schedule="cosine", eta_end=0.0), "needs total_steps > 0"),
        (dict(schedule="linear", eta_end=-1.0, total_steps=5), "needs eta_end >= 0"),
        (dict(schedule="steps", milestones=[5, 2], etas=[1.0, 0.0]), "increasing positive"),
        (dict(schedule="steps", milestones=[5], etas=[1.0, 0.0]), "same, non-zero length"),
        (dict(schedule="linear", eta_end=[0.0, 1.0, 2.0], total_steps=5), "3 values for 1 parameter groups"),
    ],
)
def test_bad_schedules_are_refused(kwargs: dict, message: str) -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        EtaScheduler(SoftAdam([w]), **kwargs)


def test_only_for_optimizers_with_eta() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="no eta"):
        EtaScheduler(torch.optim.SGD([w], lr=0.1), "constant")
