"""Property-based tests (hypothesis): SoftAdam's invariants over random shapes, dtypes,
hyperparameters and gradients, in every execution.

- the denominator stays >= 1 (every element moves at most SGD's lr*(1+eta)*|numerator|);
- with eta = 0 the step is SGD with dampened momentum;
- the three executions agree with each other and with a literal transcription of the
  equations (tests/softadam_reference.py) to float tolerance;
- a state_dict saved mid-run and loaded into a fresh optimizer continues bit for bit.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from softadam_reference import ReferenceSoftAdam

from softadam_nlp import SoftAdam

EXECUTIONS = {"per-tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 1.0),
        "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
        "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
        "eta": st.one_of(st.just(0.0), st.floats(0.0, 20.0)),
        "weight_decay": st.sampled_from([0.0, 1e-2]),
        "nesterov": st.booleans(),
    }
)


@st.composite
def problems(draw: st.DrawFn, dtypes=(torch.float32, torch.float64)) -> dict:
    """Parameters, per-step gradients (some all-zero, scales from 1e-6 to 1e3) and settings."""
    dtype = draw(st.sampled_from(dtypes))
    tensor_shapes = draw(st.lists(shapes, min_size=1, max_size=3))
    steps = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scales = [draw(st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 1e3])) for _ in tensor_shapes]
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in tensor_shapes]
    grads = [
        [
            (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
            for s, scale in zip(tensor_shapes, scales)
        ]
        for _ in range(steps)
    ]
    return {
        "params": params,
        "grads": grads,
        "hyper": draw(hyperparameters),
        "execution": draw(st.sampled_from(list(EXECUTIONS))),
    }


def run(problem: dict, execution: str) -> tuple[list[torch.nn.Parameter], SoftAdam]:
    params = [torch.nn.Parameter(p.clone()) for p in problem["params"]]
    optimizer = SoftAdam(params, **problem["hyper"], **EXECUTIONS[execution])
    return params, optimizer


@SETTINGS
@given(problem=problems())
def test_every_element_moves_at_most_as_far_as_sgd(problem: dict) -> None:
    params, optimizer = run(problem, problem["execution"])
    hyper = problem["hyper"]
    lr, eta, (beta1, _) = hyper["lr"], hyper["eta"], hyper["betas"]
    for step_grads in problem["grads"]:
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
        for p, old, grad in zip(params, before, step_grads):
            m = optimizer.state[p]["exp_avg"]
            numerator = beta1 * m + (1 - beta1) * grad if hyper["nesterov"] else m
            step = (old * (1 - lr * hyper["weight_decay"]) - p.detach()).abs()
            bound = lr * (1 + eta) * numerator.abs()
            tolerance = 8 * torch.finfo(p.dtype).eps * (old.abs() + bound)
            assert (step <= bound + tolerance).all()


@SETTINGS
@given(problem=problems())
def test_eta_zero_is_sgd_with_dampened_momentum(problem: dict) -> None:
    problem["hyper"]["eta"] = 0.0
    params, optimizer = run(problem, problem["execution"])
    hyper = problem["hyper"]
    beta1, lr = hyper["betas"][0], hyper["lr"]
    # SGD with dampened momentum in float64, from the same inputs; `scale` bounds the size of
    # every term summed into each element, so rounding in the parameter's dtype stays within
    # a few eps of it (large steps that nearly cancel leave a small value with an error of
    # the size of the steps, not of the value).
    expected = [p.double() for p in problem["params"]]
    scale = [p.abs() for p in expected]
    buffers = [torch.zeros_like(p) for p in expected]
    for step_grads in problem["grads"]:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
        for i, grad in enumerate(step_grads):
            grad = grad.double()
            buffers[i] = beta1 * buffers[i] + (1 - beta1) * grad
            numerator = beta1 * buffers[i] + (1 - beta1) * grad if hyper["nesterov"] else buffers[i]
            expected[i] = expected[i] * (1 - lr * hyper["weight_decay"]) - lr * numerator
            scale[i] = scale[i] + expected[i].abs() + lr * (numerator.abs() + grad.abs())
    for p, want, size in zip(params, expected, scale):
        tolerance = 8 * torch.finfo(p.dtype).eps * size + torch.finfo(p.dtype).tiny
        assert ((p.detach().double() - want).abs() <= tolerance).all(), (p, want)


@SETTINGS
@given(problem=problems(dtypes=(torch.float32, torch.float64, torch.bfloat16)))
def test_executions_agree_with_the_equations(problem: dict) -> None:
    hyper = problem["hyper"]
    reference = ReferenceSoftAdam(
        lr=hyper["lr"],
        beta1=hyper["betas"][0],
        beta2=hyper["betas"][1],
        eps=max(hyper["eps"], 1e-30),
        eta=hyper["eta"],
        weight_decay=hyper["weight_decay"],
        nesterov=hyper["nesterov"],
    )
    expected = [p.double() for p in problem["params"]]
    largest = [p.abs() for p in expected]  # per element, over the trajectory: bfloat16's rounding scale
    for step_grads in problem["grads"]:
        expected = [reference.step(i, p, g.double()) for i, (p, g) in enumerate(zip(expected, step_grads))]
        largest = [torch.maximum(m, p.abs()) for m, p in zip(largest, expected)]
    for execution in EXECUTIONS:
        params, optimizer = run(problem, execution)
        for step_grads in problem["grads"]:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            optimizer.step()
        for p, want, scale in zip(params, expected, largest):
            if p.dtype == torch.bfloat16:
                # Rounded into bfloat16 once per step: each rounding moves an element by up to
                # half an ulp of its value then (2**-8 relative), and later steps carry that
                # on, so the bound is absolute, in the largest value the element took.
                steps = len(problem["grads"])
                assert ((p.detach().double() - want).abs() <= steps * 2**-8 * scale + 1e-6).all()
            else:
                rtol = 1e-4 if p.dtype == torch.float32 else 1e-10
                torch.testing.assert_close(p.detach().double(), want, rtol=rtol, atol=rtol * 1e-2)


@SETTINGS
@given(problem=problems(dtypes=(torch.float32, torch.bfloat16)), split=st.integers(0, 6))
def test_state_dict_round_trip_continues_bit_for_bit(problem: dict, split: int) -> None:
    split = min(split, len(problem["grads"]))
    straight_params, straight = run(problem, problem["execution"])
    resumed_params, first = run(problem, problem["execution"])

    def steps(params, optimizer, grads) -> None:
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            optimizer.step()

    steps(straight_params, straight, problem["grads"])
    steps(resumed_params, first, problem["grads"][:split])
    saved = copy.deepcopy(first.state_dict())
    params = [torch.nn.Parameter(p.detach().clone()) for p in resumed_params]
    second = SoftAdam(params, **problem["hyper"], **EXECUTIONS[problem["execution"]])
    second.load_state_dict(saved)
    steps(params, second, problem["grads"][split:])
    for p, q in zip(params, straight_params):
        assert torch.equal(p, q)
