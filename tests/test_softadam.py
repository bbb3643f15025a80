"""SoftAdam against an independent reference, SGD, itself across executions, and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from softadam_reference import ReferenceSoftAdam

from softadam_nlp import SoftAdam

# The three executions, as SoftAdam keyword arguments.
PER_TENSOR, FOREACH, FUSED = dict(foreach=False), dict(foreach=True), dict(fused=True)
PATHS = [
    pytest.param(PER_TENSOR, id="per-tensor"),
    pytest.param(FOREACH, id="foreach"),
    pytest.param(FUSED, id="fused"),
]


def make_problem(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Parameters and data of a small two-layer regression; the loss couples all tensors."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(16, 6, generator=g, dtype=dtype) * 0.5,  # W1
        torch.randn(16, generator=g, dtype=dtype) * 0.1,  # b1
        torch.randn(3, 16, generator=g, dtype=dtype) * 0.3,  # W2
        torch.randn(3, generator=g, dtype=dtype) * 0.1,  # b2
    ]
    x = torch.randn(64, 6, generator=g, dtype=dtype)
    y = torch.randn(64, 3, generator=g, dtype=dtype)
    return params, x, y


def loss_fn(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    w1, b1, w2, b2 = params
    # A different mini-batch each step keeps gradients noisy, as in training.
    lo = (step * 16) % 64
    xb, yb = x[lo : lo + 16], y[lo : lo + 16]
    return ((torch.tanh(xb @ w1.T + b1) @ w2.T + b2 - yb) ** 2).mean()


GROUP_SETTINGS = [
    dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, eta=1.0, weight_decay=0.01),
    dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, eta=3.0, weight_decay=0.1),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_matches_reference(path: dict, nesterov: bool, dtype: torch.dtype, atol: float) -> None:
    params, x, y = make_problem(dtype)
    ours = [p.clone().requires_grad_() for p in params]
    ref_params = [p.clone() for p in params]
    groups = [
        dict(params=ours[:2], nesterov=nesterov, **GROUP_SETTINGS[0]),
        dict(params=ours[2:], nesterov=nesterov, **GROUP_SETTINGS[1]),
    ]
    opt = SoftAdam(groups, **path)
    refs = [
        ReferenceSoftAdam(
            lr=s["lr"],
            beta1=s["betas"][0],
            beta2=s["betas"][1],
            eps=s["eps"],
            eta=s["eta"],
            weight_decay=s["weight_decay"],
            nesterov=nesterov,
        )
        for s in GROUP_SETTINGS
    ]
    for step in range(120):
        opt.zero_grad()
        loss_fn(ours, x, y, step).backward()
        opt.step()

        leaves = [p.clone().requires_grad_() for p in ref_params]
        grads = torch.autograd.grad(loss_fn(leaves, x, y, step), leaves)
        ref_params = [refs[0 if i < 2 else 1].step(i, p, g) for i, (p, g) in enumerate(zip(ref_params, grads))]
    for mine, theirs in zip(ours, ref_params):
        assert (mine.detach() - theirs).abs().max().item() <= atol
    # The run moved the parameters a lot, so agreement is not trivial.
    assert all((p.detach() - q).abs().max() > 1e-2 for p, q in zip(ours, params))


@pytest.mark.parametrize("path", PATHS)
def test_eta_zero_is_sgd_with_dampened_momentum(path: dict) -> None:
    beta1, lr = 0.9, 0.05
    params, x, y = make_problem(torch.float32)
    ours = [p.clone().requires_grad_() for p in params]
    sgd_params = [p.clone().requires_grad_() for p in params]
    opt = SoftAdam(ours, lr=lr, betas=(beta1, 0.999), eta=0.0, **path)
    sgd = torch.optim.SGD(sgd_params, lr=lr, momentum=beta1, dampening=beta1, foreach=bool(path.get("foreach")))
    # torch's SGD starts its buffer at the first gradient; SoftAdam's m starts at 0.
    for p in sgd_params:
        sgd.state[p]["momentum_buffer"] = torch.zeros_like(p)
    for step in range(50):
        for o, ps in ((opt, ours), (sgd, sgd_params)):
            o.zero_grad()
            loss_fn(ps, x, y, step).backward()
            o.step()
        for p, q in zip(ours, sgd_params):
            if path is FUSED:  # its own kernel: same arithmetic, some roundings differ from torch's
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"diverged from SGD at step {step + 1}")
            else:  # the same torch kernels as SGD's: bit for bit
                assert torch.equal(p, q), f"diverged from SGD at step {step + 1}"


def _train(opt: torch.optim.Optimizer, params: list[torch.Tensor], x, y, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss_fn(params, x, y, step).float().backward()
        opt.step()


@pytest.mark.parametrize("other", [FOREACH, FUSED], ids=["foreach", "fused"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_executions_agree_with_per_tensor(other: dict, nesterov: bool) -> None:
    params, x, y = make_problem(torch.float64)
    runs = []
    for path in (PER_TENSOR, other):
        ps = [p.clone().requires_grad_() for p in params]
        opt = SoftAdam(ps, lr=0.05, eta=2.0, weight_decay=0.01, nesterov=nesterov, **path)
        _train(opt, ps, x, y, range(60))
        runs.append((ps, opt))
    for p, q in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    for p, q in zip(runs[0][0], runs[1][0]):
        s, t = runs[0][1].state[p], runs[1][1].state[q]
        assert s["step"].item() == t["step"].item() == 60
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], rtol=0, atol=1e-12)


def test_paths_agree_on_mixed_dtypes_and_uneven_step_counts() -> None:
    # One group holding fp32 and bf16 tensors (the foreach path splits it by dtype),
    # where one tensor gets no gradient for its first steps, so step counts differ
    # within the group and the foreach path needs per-tensor coefficients.
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(5, 4, generator=g), torch.randn(7, generator=g).bfloat16(), torch.randn(3, generator=g)]
    grads = [[torch.randn(p.shape, generator=g).to(p.dtype) for p in init] for _ in range(12)]
    runs = []
    for path in (PER_TENSOR, FOREACH, FUSED):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = SoftAdam(ps, lr=0.05, eta=2.0, weight_decay=0.01, **path)
        for step, step_grads in enumerate(grads):
            for i, (p, grad) in enumerate(zip(ps, step_grads)):
                p.grad = None if (i == 2 and step < 4) else grad.clone()
            opt.step()
        assert opt.state[ps[0]]["step"].item() == 12 and opt.state[ps[2]]["step"].item() == 8
        runs.append(ps)
    for other in runs[1:]:
        for p, q in zip(runs[0], other):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6 if p.dtype == torch.float32 else 1e-2)
    # The late tensor followed the paper with its own step count (t = 1 at its first step).
    ref = ReferenceSoftAdam(lr=0.05, eta=2.0, weight_decay=0.01)
    expected = init[2]
    for step_grads in grads[4:]:
        expected = ref.step(2, expected, step_grads[2])
    for run in runs[1:]:
        torch.testing.assert_close(run[2].detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_state_dict_resume_is_bit_exact(path: dict, dtype: torch.dtype) -> None:
    params, x, y = make_problem(torch.float32)
    params = [p.to(dtype) for p in params]

    def fresh():
        ps = [p.clone().requires_grad_() for p in params]
        groups = [dict(params=ps[:2], **GROUP_SETTINGS[0]), dict(params=ps[2:], **GROUP_SETTINGS[1])]
        return ps, SoftAdam(groups, nesterov=True, **path)

    straight, opt = fresh()
    _train(opt, straight, x.to(dtype), y.to(dtype), range(40))

    first, opt1 = fresh()
    _train(opt1, first, x.to(dtype), y.to(dtype), range(25))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed, opt2 = fresh()
    with torch.no_grad():
        for p, q in zip(resumed, saved["params"]):
            p.copy_(q)
    opt2.load_state_dict(saved["optimizer"])
    for p in resumed:
        assert opt2.state[p]["exp_avg"].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    _train(opt2, resumed, x.to(dtype), y.to(dtype), range(25, 40))
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_params_keep_fp32_state_and_match_fp32_arithmetic(path: dict) -> None:
    params, x, y = make_problem(torch.float32)
    ours = [p.to(torch.bfloat16).requires_grad_() for p in params]
    opt = SoftAdam(ours, lr=0.05, weight_decay=0.01, **path)
    ref = ReferenceSoftAdam(lr=0.05, weight_decay=0.01)
    ref_params = [p.to(torch.bfloat16) for p in params]
    for step in range(30):
        opt.zero_grad()
        loss_fn(ours, x.bfloat16(), y.bfloat16(), step).backward()
        opt.step()
        leaves = [p.clone().requires_grad_() for p in ref_params]
        grads = torch.autograd.grad(loss_fn(leaves, x.bfloat16(), y.bfloat16(), step), leaves)
        # The reference: float32 arithmetic and state, rounded into bf16 once per step.
        ref_params = [
            ref.step(i, p.float(), g.float()).to(torch.bfloat16) for i, (p, g) in enumerate(zip(ref_params, grads))
        ]
        # Allow one bf16 rounding step where fp32 results straddle a rounding boundary.
        for p, q in zip(ours, ref_params):
            torch.testing.assert_close(p.detach(), q, rtol=1e-2, atol=1e-3)
    for p in ours:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_parameters_without_gradient_are_untouched() -> None:
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = SoftAdam([a, b], lr=0.1)
    a.sum().backward()
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))
    assert b not in opt.state
    assert opt.state[a]["step"].item() == 1


def test_closure_is_evaluated_with_grad_and_its_loss_returned() -> None:
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = SoftAdam([w], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1]
    assert loss.item() == pytest.approx(13.0)
    assert (w.detach().abs() < torch.tensor([3.0, 2.0])).all()


@pytest.mark.parametrize("path", PATHS)
def test_maximize_ascends(path: dict) -> None:
    w = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
    opt = SoftAdam([w], lr=0.05, maximize=True, **path)
    for _ in range(20):
        opt.zero_grad()
        (-(w**2).sum()).backward()  # maximum at 0
        opt.step()
    assert w.detach().abs().max() < 0.5


def test_all_zero_gradient_with_zero_eps_is_finite() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    opt = SoftAdam([w], lr=0.1, eps=0.0, eta=5.0)
    w.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-0.1), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(eta=-0.5), "eta"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(betas=(1.0, 0.999)), "betas[0]"),
        (dict(betas=(-0.1, 0.999)), "betas[0]"),
        (dict(betas=(0.9, 1.0)), "betas[1]"),
        (dict(betas=(0.9, 1.5)), "betas[1]"),
        (dict(betas=(0.9,)), "betas"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        SoftAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_group_hyperparameter_raises() -> None:
    good = torch.nn.Parameter(torch.ones(2))
    bad = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="eta"):
        SoftAdam([{"params": [good]}, {"params": [bad], "eta": -1.0}])


def test_sparse_gradient_raises() -> None:
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SoftAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_complex_parameter_raises() -> None:
    with pytest.raises(ValueError, match="complex"):
        SoftAdam([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])


def test_denominator_never_below_one_means_step_bounded_by_sgd() -> None:
    # d >= 1 for every eta >= 0: each element moves at most lr*(1+eta)*|m|.
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.zeros(1000))
    lr, eta = 0.1, 4.0
    opt = SoftAdam([w], lr=lr, eta=eta, betas=(0.0, 0.9))  # beta1=0: m == g
    for _ in range(10):
        before = w.detach().clone()
        grad = torch.randn(1000, generator=g) * torch.logspace(-4, 2, 1000)
        w.grad = grad
        opt.step()
        step = (w.detach() - before).abs()
        assert (step <= lr * (1 + eta) * grad.abs() * (1 + 1e-6)).all()
        # Large-gradient elements are damped strictly: the step is not plain SGD.
        assert (step[-10:] < 0.9 * lr * (1 + eta) * grad[-10:].abs()).all()


def test_deepcopy_and_repr() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = SoftAdam([w], eta=2.0)
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["eta"] == 2.0
    assert "SoftAdam" in repr(opt) and "eta: 2.0" in repr(opt)


def test_tensors_it_was_not_built_with_are_refused() -> None:
    # A wrapper that swaps the optimizer's tensors for flat copies (as DeepSpeed's fp16
    # optimizer and fairscale do) would turn the mean of v over each tensor into a mean over
    # the flat buffer: the first step refuses, naming what happened (layout.py).
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    opt = SoftAdam([a, b], lr=0.1)
    flat = torch.nn.Parameter(torch.cat([a.detach().flatten(), b.detach().flatten()]))
    flat.grad = torch.ones(7)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match="a tensor of shape \\(7,\\) that it was not built with") as caught:
        opt.step()
    assert "DeepSpeed ZeRO stages 0-2" in str(caught.value) and torch.equal(flat.detach(), torch.ones(7))
    # Parameters added through add_param_group are its own.
    c = torch.nn.Parameter(torch.ones(4))
    opt.param_groups[0]["params"] = [a, b]
    opt.add_param_group({"params": [c]})
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert (c.detach() < 1).all()


def test_a_flattening_wrappers_flat_parameter_is_refused() -> None:
    # fairscale's FSDP builds the optimizer over its own FlatParameter class (the real one
    # needs fairscale, which is not installed): a parameter of that class name that is not
    # torch's FSDP1 FlatParameter is refused by name at the first step.
    class FlatParameter(torch.nn.Parameter):
        pass

    flat = FlatParameter(torch.ones(7))
    flat.grad = torch.ones(7)
    with pytest.raises(ValueError, match="fairscale's FSDP or a flattening wrapper") as caught:
        SoftAdam([flat], lr=0.1).step()
    assert "mean over the flat buffer" in str(caught.value) and torch.equal(flat.detach(), torch.ones(7))
