"""The fused GPU execution (softadam_nlp/_triton.py) against the per-tensor reference.

On a machine with a CUDA device the kernels run natively there. Without one, Triton's
interpreter runs the same kernels on CPU tensors (TRITON_INTERPRET=1, set below before
anything imports triton, and `softadam._TRITON_ON_CPU`, which lets SoftAdam pick the
GPU execution for CPU tensors), so every CI run checks their arithmetic and their
bookkeeping: the step counters and the means of v on the device, the found_inf flag,
the address tables.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import importlib  # noqa: E402

from softadam_nlp import SoftAdam, _triton, softadam  # noqa: E402

softadam_module = importlib.import_module("softadam_nlp.softadam")  # the module, not the function it exports
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreted kernels are made when the module is imported: it must not have been before.
assert DEVICE == "cuda" or _triton.INTERPRETED, "softadam_nlp._triton was imported before TRITON_INTERPRET=1 was set"
pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def gpu_execution_on_cpu(monkeypatch):
    """On a machine without CUDA, SoftAdam picks the GPU execution for CPU tensors."""
    if DEVICE == "cpu":
        monkeypatch.setattr(softadam_module, "_TRITON_ON_CPU", True)


def shapes() -> list[tuple[int, ...]]:
    # More than one update chunk (UPDATE_BLOCK elements) in one tensor, several small
    # tensors, a one-element tensor, an odd length and an empty tensor.
    return [(90, 101), (400,), (64, 64), (1,), (1001,), (0, 3)]


HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def functional_run(
    fused: bool, dtype: torch.dtype, steps: int, eta: float = 1.0, nesterov: bool = False, maximize: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """`steps` functional steps on gradients whose scale differs by tensor (fixed seed):
    the fused GPU execution, or the per-tensor reference. Returns params, exp_avg_sqs,
    the means of v (fused only) and the step counters."""
    g = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes()]
    state_dtype = torch.float32
    exp_avgs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    exp_avg_sqs = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    step_device = DEVICE if fused else "cpu"
    state_steps = [torch.tensor(0.0, device=step_device) for _ in params]
    means = [torch.zeros((), dtype=torch.float64, device=DEVICE) for _ in params]
    for _ in range(steps):
        grads = [(torch.randn(p.shape, generator=g) * 10.0 ** (i - 2)).to(DEVICE, dtype) for i, p in enumerate(params)]
        common = dict(eta=eta, nesterov=nesterov, maximize=maximize, **HYPER)
        if fused:
            softadam(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_sq_means=means, fused=True, **common)
        else:
            softadam(params, grads, exp_avgs, exp_avg_sqs, state_steps, foreach=False, **common)
    return params, exp_avg_sqs, means, state_steps


def assert_same_run(ours: list[torch.Tensor], reference: list[torch.Tensor], dtype: torch.dtype) -> None:
    for p, q in zip(ours, reference):
        if not q.numel():
            assert p.shape == q.shape
        elif dtype == torch.float32:
            # Rounding differences random-walk over the steps (torch's kernels fuse some
            # multiply-adds, the GPU's may fuse others): a few 1e-7 of the scale.
            assert (p - q).abs().max() <= 1e-5 * q.abs().max()
        else:
            # A low-precision rounding step where the float32 results straddle a boundary,
            # carried along from where the element was larger: a rounding step of the element
            # plus 1/64 of one of the tensor's largest. A rounding that drifts (truncating
            # instead of rounding to nearest) is off by hundreds of those.
            eps = torch.finfo(dtype).eps
            bound = 2 * eps * q.float().abs() + eps / 64 * q.float().abs().max()
            assert ((p.float() - q.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "variant",
    [dict(), dict(nesterov=True), dict(eta=0.0), dict(maximize=True, eta=4.0)],
    ids=["plain", "nesterov", "eta0", "maximize-eta4"],
)
def test_fused_gpu_matches_per_tensor_over_hundreds_of_steps(dtype: torch.dtype, variant: dict) -> None:
    # Hundreds of steps where it matters most; the interpreter takes ~0.1 s a step.
    steps = (200 if dtype == torch.float32 else 100) if variant == {} else 40
    params, exp_avg_sqs, means, state_steps = functional_run(True, dtype, steps, **variant)
    ref_params, ref_exp_avg_sqs, _, _ = functional_run(False, dtype, steps, **variant)
    assert_same_run([p.cpu() for p in params], [p.cpu() for p in ref_params], dtype)
    for v, w, mean, step in zip(exp_avg_sqs, ref_exp_avg_sqs, means, state_steps):
        torch.testing.assert_close(v.cpu(), w.cpu(), rtol=1e-5, atol=0)
        # The mean advanced by its recurrence on the device is the mean of v.
        if v.numel():
            torch.testing.assert_close(mean.cpu(), v.double().mean().cpu(), rtol=1e-5, atol=0)
        assert step.device.type == DEVICE and step.item() == steps


def test_eta_zero_is_exactly_sgd_with_dampened_momentum() -> None:
    params, _, _, _ = functional_run(True, torch.float32, 5, eta=0.0)
    g = torch.Generator().manual_seed(7)
    expected = [torch.randn(s, generator=g).to(DEVICE) for s in shapes()]
    buffers = [torch.zeros_like(p) for p in expected]
    for _ in range(5):
        for i, (p, buf) in enumerate(zip(expected, buffers)):
            grad = (torch.randn(p.shape, generator=g) * 10.0 ** (i - 2)).to(DEVICE)
            buf.mul_(0.9).add_(grad, alpha=0.1)
            p.mul_(1 - 0.01 * 0.01).add_(buf, alpha=-0.01)
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def make_optimizer(dtype: torch.dtype = torch.float32, **options) -> tuple[list[torch.nn.Parameter], SoftAdam]:
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, dtype)) for s in shapes()]
    return params, SoftAdam(params, lr=0.01, weight_decay=0.01, **options)


def set_grads(params: list[torch.nn.Parameter], generator: torch.Generator, bad: bool = False) -> None:
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator) * 10.0 ** (i - 2)
        if bad and i == 1:
            grad[3] = float("inf")
        p.grad = grad.to(DEVICE, p.dtype)


def test_the_class_picks_the_gpu_execution_and_matches_the_reference() -> None:
    fused_params, fused = make_optimizer()  # fused=None: the default picks it
    ref_params, reference = make_optimizer(foreach=False)
    for params, opt in ((fused_params, fused), (ref_params, reference)):
        g = torch.Generator().manual_seed(5)
        for _ in range(30):
            set_grads(params, g)
            opt.step()
    assert_same_run(fused_params, ref_params, torch.float32)
    state = fused.state[fused_params[0]]
    assert state["step"].device.type == DEVICE and state["step"].item() == 30
    assert fused._kept_means[fused_params[0]].value.dtype == torch.float64
    # Switching to the per-tensor execution moves the counter to the CPU and keeps counting.
    fused.param_groups[0]["foreach"] = False
    set_grads(fused_params, torch.Generator().manual_seed(9))
    fused.step()
    assert state["step"].device.type == "cpu" and state["step"].item() == 31
    assert fused_params[0] not in fused._kept_means


def test_a_loaded_state_rebuilds_the_means_by_the_rule() -> None:
    """After load_state_dict the means of v, which the kernels carry on the device, start
    again from the loaded v: one step with zero gradients leaves each at (1 - w) times the
    float64 mean of the loaded v (w = max(1 - beta2, 1/t)), to the order of float64 additions."""
    params, opt = make_optimizer()
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        set_grads(params, g)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved.pop("exp_avg_sq_means")  # as the engines that reshard the state hand it over
    for _ in range(3):  # the live optimizer's own means move on, and must not be used
        set_grads(params, g)
        opt.step()
    opt.load_state_dict(saved)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, state in zip(params, saved["state"].values()):
        if p.numel() == 0:
            continue
        w = max(1 - 0.999, 1 / float(opt.state[p]["step"]))
        want = (1 - w) * (state["exp_avg_sq"].double().sum() / p.numel())
        got = opt._kept_means[p].value
        assert got.device.type == DEVICE
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_refused_step_changes_nothing(nonfinite: str) -> None:
    params, opt = make_optimizer(nonfinite=nonfinite)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        set_grads(params, g)
        opt.step()
    before = {name: [opt.state[p][name].clone() for p in params] for name in ("exp_avg", "exp_avg_sq", "step")}
    means = [opt._kept_means[p].value.clone() for p in params]
    values = [p.detach().clone() for p in params]
    set_grads(params, g, bad=True)
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="parameter 1 of param group 0"):
            opt.step()
    else:
        opt.step()  # decided on the device: the flag gates the kernels
        assert opt._skipped_on_device is not None
    assert opt.skipped_steps == (1 if nonfinite == "skip" else 0)
    for p, value, mean in zip(params, values, means):
        assert torch.equal(p.detach(), value) and torch.equal(opt._kept_means[p].value, mean)
    for name, tensors in before.items():
        for p, tensor in zip(params, tensors):
            assert torch.equal(opt.state[p][name], tensor), name
    # And the next good step goes on from where the run was.
    set_grads(params, g)
    opt.step()
    assert opt.state[params[0]]["step"].item() == 4


def test_skipped_steps_survive_a_state_round_trip() -> None:
    import copy

    params, opt = make_optimizer(nonfinite="skip")
    g = torch.Generator().manual_seed(5)
    set_grads(params, g, bad=True)
    opt.step()
    set_grads(params, g)
    opt.step()
    assert copy.deepcopy(opt).skipped_steps == opt.skipped_steps == 1


def test_tensors_stepped_later_keep_their_own_step_counts() -> None:
    fused_params, fused = make_optimizer()
    ref_params, reference = make_optimizer(foreach=False)
    for params, opt in ((fused_params, fused), (ref_params, reference)):
        g = torch.Generator().manual_seed(5)
        for step in range(12):
            set_grads(params, g)
            if step < 6:
                params[2].grad = None  # joins at step 7: its own bias correction
            opt.step()
    assert fused.state[fused_params[2]]["step"].item() == 6
    assert_same_run(fused_params, ref_params, torch.float32)


def test_mixed_dtypes_in_one_group() -> None:
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=g) for s in shapes()]
    runs = []
    for options in (dict(fused=True), dict(foreach=False)):
        params = [
            torch.nn.Parameter(t.to(DEVICE, torch.bfloat16 if i % 2 else torch.float32)) for i, t in enumerate(init)
        ]
        opt = SoftAdam(params, lr=0.01, **options)
        g = torch.Generator().manual_seed(5)
        for _ in range(10):
            set_grads(params, g)
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        assert_same_run([p], [q], p.dtype)


def test_address_tables_are_reused_and_rebuilt_when_a_tensor_moves() -> None:
    _triton._TABLES.clear()
    params, opt = make_optimizer()
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        set_grads(params, g)  # new gradient tensors: their memory may or may not be reused
        opt.step()
    tables = len(_triton._TABLES)
    for _ in range(3):
        for p in params:
            p.grad.normal_()  # the same gradient tensors: the same addresses
        opt.step()
    assert len(_triton._TABLES) == tables
    params[0].grad = params[0].grad.clone()  # a new address must give a new table
    opt.step()
    assert len(_triton._TABLES) == tables + 1


def test_fused_true_refuses_float64_with_the_reason() -> None:
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64, device=DEVICE))]
    opt = SoftAdam(params, fused=True)
    params[0].grad = torch.randn(4, dtype=torch.float64, device=DEVICE)
    if DEVICE == "cpu":  # the CPU kernel takes float64; only the GPU execution refuses it
        softadam_module._TRITON_ON_CPU = True
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()


def test_found_inf_is_refused_by_the_other_executions() -> None:
    p = [torch.randn(3, device=DEVICE)]
    with pytest.raises(ValueError, match="found_inf"):
        softadam(
            p,
            [torch.randn(3, device=DEVICE)],
            [torch.zeros(3, device=DEVICE)],
            [torch.zeros(3, device=DEVICE)],
            [torch.tensor(0.0)],
            found_inf=torch.zeros((), device=DEVICE),
            foreach=False,
            eta=1.0,
            nesterov=False,
            maximize=False,
            **HYPER,
        )
