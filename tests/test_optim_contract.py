"""The torch.optim contract, in every execution: what torch's own optimizers do, SoftAdam does.

Each test runs over the four executions (per-tensor, foreach, the fused CPU kernel, and
the default choice), the way torch's generic optimizer tests run over every optimizer.
"""

from __future__ import annotations

import copy
import pickle
from typing import Callable

import pytest
import torch
from softadam_reference import ReferenceSoftAdam
from torch._dynamo.testing import CompileCounterWithBackend

from softadam_nlp import SoftAdam

EXECUTIONS = {
    "per-tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "default": {},
}
ALL = pytest.mark.parametrize("execution", list(EXECUTIONS))
HYPER = dict(lr=0.05, eta=2.0, weight_decay=0.01, nesterov=True)


def make_params(seed: int = 0, dtypes: tuple[torch.dtype, ...] = (torch.float32,) * 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 2, 2)]
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for shape, dtype in zip(shapes, dtypes)]


def gradients(params: list[torch.Tensor], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def run(
    opt: torch.optim.Optimizer,
    params: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    between: Callable[[int], None] = lambda step: None,
) -> None:
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        between(step)


def assert_same(ps: list[torch.Tensor], qs: list[torch.Tensor]) -> None:
    for p, q in zip(ps, qs):
        assert torch.equal(p, q), (p - q).abs().max()


def fresh_copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


# --- state_dict forms ---------------------------------------------------------------


def interrupted_run(execution: str, steps: int, saved_after: int) -> tuple:
    """An uninterrupted run of `steps` steps, and the same run's parameters and state_dict
    after `saved_after` of them: (gradients, straight parameters, parameters, state_dict)."""
    params = make_params()
    grads = gradients(params, steps)
    straight = fresh_copy(params)
    run(SoftAdam(straight, **HYPER, **EXECUTIONS[execution]), straight, grads)
    first = fresh_copy(params)
    opt = SoftAdam(first, **HYPER, **EXECUTIONS[execution])
    run(opt, first, grads[:saved_after])
    return grads, straight, first, opt.state_dict()


@ALL
@pytest.mark.parametrize("number", [int, float], ids=["int-step", "float-step"])
def test_a_python_number_step_in_the_state_dict_resumes_exactly(execution: str, number: type) -> None:
    """Older checkpoints, and other tools, store ``step`` as a Python number: loading it
    continues exactly as the uninterrupted run does, and ``step`` keeps advancing."""
    grads, straight, first, saved = interrupted_run(execution, steps=12, saved_after=5)
    for state in saved["state"].values():
        state["step"] = number(state["step"].item())
    resumed = fresh_copy(first)
    opt = SoftAdam(resumed, **HYPER, **EXECUTIONS[execution])
    opt.load_state_dict(saved)
    run(opt, resumed, grads[5:])
    assert [opt.state[p]["step"].item() for p in resumed] == [12.0] * 3
    assert all(isinstance(opt.state[p]["step"], torch.Tensor) for p in resumed)
    assert_same(resumed, straight)


@ALL
def test_state_dicts_of_older_versions_load_and_resume(execution: str) -> None:
    """Groups saved before ``nonfinite``, ``fused`` and ``foreach`` existed, and state saved
    without the fused execution's mean of v: they load with the defaults and resume (the
    mean is rebuilt from v, which agrees to rounding)."""
    grads, straight, first, saved = interrupted_run(execution, steps=10, saved_after=4)
    for group in saved["param_groups"]:
        for key in ("nonfinite", "fused", "foreach", "maximize", "differentiable"):
            group.pop(key, None)
    saved.pop("exp_avg_sq_means", None)
    resumed = fresh_copy(first)
    opt = SoftAdam(resumed, **HYPER)
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert (group["nonfinite"], group["fused"], group["foreach"], group["maximize"]) == ("raise", None, None, False)
    for key, value in EXECUTIONS[execution].items():
        group[key] = value
    run(opt, resumed, grads[4:])
    for p, q in zip(resumed, straight):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# --- tensor lr ------------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1-dim", "2-dim"])
def test_a_tensor_lr_steps_as_its_value_does_and_follows_in_place_changes(execution: str, shape: tuple) -> None:
    params = make_params()
    grads = gradients(params, 8)
    lrs = [0.05, 0.05, 0.02, 0.02, 0.01, 0.03, 0.03, 0.005]
    lr = torch.full(shape, lrs[0], dtype=torch.float64)
    with_tensor = fresh_copy(params)
    opt = SoftAdam(with_tensor, **{**HYPER, "lr": lr}, **EXECUTIONS[execution])
    run(opt, with_tensor, grads, between=lambda step: lr.fill_(lrs[min(step + 1, 7)]))
    with_float = fresh_copy(params)
    opt = SoftAdam(with_float, **{**HYPER, "lr": lrs[0]}, **EXECUTIONS[execution])

    def set_lr(step: int) -> None:
        opt.param_groups[0]["lr"] = lrs[min(step + 1, 7)]

    run(opt, with_float, grads, between=set_lr)
    assert_same(with_tensor, with_float)


@ALL
def test_a_tensor_lr_works_with_torch_lr_schedulers(execution: str) -> None:
    params = make_params()
    grads = gradients(params, 6)
    results = []
    for lr in (torch.tensor(0.05), 0.05):
        ps = fresh_copy(params)
        opt = SoftAdam(ps, **{**HYPER, "lr": lr}, **EXECUTIONS[execution])
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        run(opt, ps, grads, between=lambda step, schedule=schedule: schedule.step())
        results.append(ps)
    assert_same(*results)


@pytest.mark.parametrize("where", ["defaults", "group"])
def test_a_tensor_lr_of_several_elements_is_a_value_error(where: str) -> None:
    lr = torch.tensor([1e-3, 1e-3])
    with pytest.raises(ValueError, match="Invalid lr=.*exactly one element, it has 2"):
        if where == "defaults":
            SoftAdam(make_params(), lr=lr)
        else:
            SoftAdam([{"params": make_params(), "lr": lr}])


def test_a_negative_tensor_lr_is_refused_as_a_negative_float_is() -> None:
    with pytest.raises(ValueError, match="Invalid lr=.*must be >= 0"):
        SoftAdam(make_params(), lr=torch.tensor(-1.0))


@pytest.mark.parametrize("execution", ["per-tensor", "foreach", "default"])
def test_a_compiled_step_with_a_tensor_lr_matches_eager_and_does_not_recompile(execution: str) -> None:
    """A tensor lr is what lets a compiled step follow an lr schedule without recompiling."""
    torch._dynamo.reset()
    params = make_params()
    grads = gradients(params, 8)
    lrs = [0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01, 0.005]
    results, frames = [], []
    for compiled in (False, True):
        ps = fresh_copy(params)
        lr = torch.tensor(lrs[0])
        opt = SoftAdam(ps, **{**HYPER, "lr": lr}, **EXECUTIONS[execution])
        counter = CompileCounterWithBackend("inductor")
        step = torch.compile(opt.step, backend=counter) if compiled else opt.step
        for index, step_grads in enumerate(grads):
            lr.fill_(lrs[index])
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            step()
            frames.append(counter.frame_count)
        results.append(ps)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    compiled_frames = frames[len(grads) :]
    assert compiled_frames[0] > 0, "nothing was compiled"
    # Step 1 creates the state; from step 2 on one graph serves every lr and step count.
    assert compiled_frames[-1] == compiled_frames[1], f"recompiled as the lr changed: {compiled_frames}"


# --- copies, pickles, hooks -------------------------------------------------------------


@ALL
def test_deepcopy_and_pickle_give_an_independent_optimizer_that_continues_identically(execution: str) -> None:
    params = make_params()
    grads = gradients(params, 9)
    opt = SoftAdam(params, **HYPER, nonfinite="skip", **EXECUTIONS[execution])
    run(opt, params, grads[:4])
    params[0].grad = torch.full_like(params[0], float("nan"))
    opt.step()  # skipped, and counted
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    before = [p.detach().clone() for p in params]
    for other in copies:
        assert other.skipped_steps == opt.skipped_steps == 1
        assert other.param_groups[0]["params"][0] is not params[0]
        other_params = other.param_groups[0]["params"]
        run(other, other_params, grads[4:])
    assert_same(params, before)  # the copies' steps left the original alone
    run(opt, params, grads[4:])
    for other in copies:
        assert_same(other.param_groups[0]["params"], params)


@ALL
def test_step_and_state_dict_hooks_are_called(execution: str) -> None:
    params = make_params()
    opt = SoftAdam(params, **HYPER, **EXECUTIONS[execution])
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))

    def state_dict_post(o, state_dict):
        calls.append("sd-post")
        state_dict["extra"] = 1
        return state_dict

    opt.register_state_dict_post_hook(state_dict_post)
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load-pre") or {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    run(opt, params, gradients(params, 2))
    saved = opt.state_dict()
    assert saved["extra"] == 1
    opt.load_state_dict(saved)
    assert calls == ["pre", "post", "pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


# --- unusual tensors -------------------------------------------------------------------


@ALL
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_zero_gradients_change_nothing_without_weight_decay(execution: str, eps: float) -> None:
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = SoftAdam(params, lr=0.1, eta=3.0, eps=eps, **EXECUTIONS[execution])
    run(opt, params, [[torch.zeros_like(p) for p in params]] * 3)
    assert_same(params, before)
    assert all(torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0 for p in params)


@ALL
def test_a_tensor_whose_gradient_turns_zero_keeps_moving_on_momentum(execution: str) -> None:
    params = make_params()
    grads = gradients(params, 6)
    for step in range(3, 6):
        grads[step][1] = torch.zeros_like(params[1])  # one tensor's gradient is all zero from step 4
    ours = fresh_copy(params)
    run(SoftAdam(ours, **HYPER, **EXECUTIONS[execution]), ours, grads)
    reference = ReferenceSoftAdam(lr=HYPER["lr"], eta=HYPER["eta"], weight_decay=HYPER["weight_decay"], nesterov=True)
    expected = [p.detach().clone() for p in params]
    for step_grads in grads:
        expected = [reference.step(i, p, g) for i, (p, g) in enumerate(zip(expected, step_grads))]
    for p, q in zip(ours, expected):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


@ALL
def test_zero_dim_and_empty_parameters(execution: str) -> None:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn((), generator=g).requires_grad_(),
        torch.zeros(0, 3).requires_grad_(),
        torch.randn(4, generator=g).requires_grad_(),
    ]
    grads = gradients(params, 5)
    opt = SoftAdam(params, **HYPER, **EXECUTIONS[execution])
    reference = ReferenceSoftAdam(lr=HYPER["lr"], eta=HYPER["eta"], weight_decay=HYPER["weight_decay"], nesterov=True)
    expected = [p.detach().clone() for p in params]
    run(opt, params, grads)
    for step_grads in grads:
        expected = [reference.step(i, p, g) for i, (p, g) in enumerate(zip(expected, step_grads))]
    for p, q in zip(params, expected):
        assert p.shape == q.shape
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    assert params[1].shape == (0, 3) and opt.state[params[1]]["exp_avg"].shape == (0, 3)


@ALL
def test_mixed_dtypes_in_one_group_step_as_each_alone(execution: str) -> None:
    """One group holding float64, float32 and bfloat16 tensors: each is stepped as it
    would be in a group of its own (vbar is per tensor, whatever its neighbours)."""
    params = make_params(dtypes=(torch.float64, torch.float32, torch.bfloat16))
    grads = gradients(params, 7)
    together = fresh_copy(params)
    run(SoftAdam(together, **HYPER, **EXECUTIONS[execution]), together, grads)
    for index, param in enumerate(params):
        alone = fresh_copy([param])
        run(SoftAdam(alone, **HYPER, **EXECUTIONS[execution]), alone, [[g[index]] for g in grads])
        assert together[index].dtype == param.dtype
        assert_same([together[index]], alone)


@pytest.mark.parametrize("execution", ["per-tensor", "foreach", "default"])
def test_meta_tensors_step_without_values(execution: str) -> None:
    """Meta tensors (shapes only, as for tracing or deferred initialisation) step as torch's
    optimizers step them: the state is made, on the meta device, and nothing is read."""
    params = [torch.empty(4, 3, device="meta", requires_grad=True), torch.empty(3, device="meta", requires_grad=True)]
    opt = SoftAdam(params, **HYPER, **EXECUTIONS[execution])
    for _ in range(2):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].device.type == "meta" and state["exp_avg"].shape == p.shape
        assert state["step"].item() == 2


@ALL
def test_parameters_on_two_devices_in_one_group_are_refused_by_name(execution: str) -> None:
    params = [torch.zeros(3, requires_grad=True), torch.empty(3, device="meta", requires_grad=True)]
    opt = SoftAdam(params, **HYPER, **EXECUTIONS[execution])
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param group 0 holds parameters on more than one device \(cpu, meta\)"):
        opt.step()
    assert torch.equal(params[0], torch.zeros(3))
