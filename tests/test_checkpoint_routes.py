"""Checkpoints that go anywhere: what SoftAdam saves, how the means of v start again from a
loaded v, and every engine's own save/load route across world sizes and into one process
(docs/distributed.md, "Checkpoints").

The means of v over each original tensor are derived from v, not state: ``state`` holds
AdamW's keys only, so every engine carries it as it carries AdamW's, and after a load each
mean is rebuilt as the float64 mean of the loaded v over its whole original tensor. The
first half of this file pins that rule on one process; the second runs the routes in two
launches (tests/checkpoint_routes_worker.py): 2 ranks that save and resume on 2 ranks, then one
process that resumes every checkpoint alone.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_routes_worker import FSDP1_ROUTES, FSDP2_ROUTES, OPTIMIZERS, ZERO_STAGES  # noqa: E402
from repo_scripts import run_under_torchrun  # noqa: E402

from softadam_nlp import SoftAdam  # noqa: E402

EXECUTIONS = {
    "per-tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "default": {},
}
ADAMW_KEYS = {"step", "exp_avg", "exp_avg_sq"}
# As in tests/test_sharded.py: the two ranks' halves add up in another order than one
# process's whole batch (errors seen: about 1e-7).
RTOL = 1e-5
# A rebuilt mean against the rule computed here: only the order of float64 additions differs.
RULE_RTOL = 1e-14


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(6, 5), (5,), (3, 2, 2)]]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g) * 10.0**-i
        opt.step()


def rebuilt_means(opt: SoftAdam, params: list[torch.Tensor]) -> list[float]:
    """One step with all-zero gradients: each kept mean becomes (1 - w) times the one the step
    started from, w = max(1 - beta2, 1/t). Returns, per tensor, that starting mean."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    means = []
    for p in params:
        w = max(1 - opt.param_groups[0]["betas"][1], 1 / float(opt.state[p]["step"]))
        means.append(float(opt._kept_means[p].value) / (1 - w))
    return means


def the_rule(state_dict: dict) -> list[float]:
    """The rule: the float64 mean of the loaded v over the whole tensor."""
    return [float(s["exp_avg_sq"].double().sum() / s["exp_avg_sq"].numel()) for s in state_dict["state"].values()]


# --- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("execution", list(EXECUTIONS))
def test_the_state_holds_adamws_keys_and_the_means_of_whole_tensors_ride_beside_it(execution: str) -> None:
    params = make_params()
    opt = SoftAdam(params, lr=0.1, **EXECUTIONS[execution])
    run(opt, params, 3)
    saved = opt.state_dict()
    assert all(set(state) == ADAMW_KEYS for state in saved["state"].values())
    carried = saved.get("exp_avg_sq_means", {})
    # On the CPU the default is the fused kernel, the one execution that carries the means.
    if execution in ("fused", "default"):
        assert sorted(carried) == [0, 1, 2] and all(m.dtype == torch.float64 and m.dim() == 0 for m in carried.values())
    else:
        assert carried == {}


@pytest.mark.parametrize("execution", ["fused", "default"])
def test_a_state_without_means_rebuilds_them_by_the_rule_and_resumes(execution: str) -> None:
    params = make_params()
    opt = SoftAdam(params, lr=0.1, **EXECUTIONS[execution])
    run(opt, params, 4)
    saved = copy.deepcopy(opt.state_dict())
    saved.pop("exp_avg_sq_means")  # as FSDP, DCP and DeepSpeed's converters hand it over
    # Into the same, live optimizer, 3 steps further on: its kept means must not be used.
    run(opt, params, 3, seed=2)
    stale = [float(opt._kept_means[p].value) for p in params]
    opt.load_state_dict(saved)
    got = rebuilt_means(opt, params)
    assert got == pytest.approx(the_rule(saved), rel=RULE_RTOL, abs=0)
    assert got != pytest.approx(stale, rel=1e-3)  # the test can tell a stale mean from the rule


@pytest.mark.parametrize("execution", ["per-tensor", "fused"])
def test_a_resume_without_means_continues_to_float32_rounding(execution: str) -> None:
    """The rebuilt mean differs from the running one only by v's float32 rounding."""
    straight = make_params()
    run(SoftAdam(straight, lr=0.1, **EXECUTIONS[execution]), straight, 12)
    first = make_params()
    opt = SoftAdam(first, lr=0.1, **EXECUTIONS[execution])
    run(opt, first, 5)
    saved = copy.deepcopy(opt.state_dict())
    saved.pop("exp_avg_sq_means", None)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    again = SoftAdam(resumed, lr=0.1, **EXECUTIONS[execution])
    again.load_state_dict(saved)
    g = torch.Generator().manual_seed(1)
    for step in range(12):  # the same gradients as the straight run's, from step 6 on
        grads = [torch.randn(p.shape, generator=g) * 10.0**-i for i, p in enumerate(resumed)]
        if step >= 5:
            for p, grad in zip(resumed, grads):
                p.grad = grad
            again.step()
    for p, q in zip(resumed, straight):
        if execution == "per-tensor":
            assert torch.equal(p, q)  # it takes mean(v) from v at every step anyway
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_older_checkpoints_load_their_means_of_whole_tensors_and_drop_the_rest() -> None:
    params = make_params()
    opt = SoftAdam(params, lr=0.1)
    run(opt, params, 4)
    saved = copy.deepcopy(opt.state_dict())
    # The old form: the mean inside each tensor's state.
    for param_id, mean in saved.pop("exp_avg_sq_means").items():
        saved["state"][param_id]["exp_avg_sq_mean"] = mean
    straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
    run(opt, params, 3, seed=2)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    again = SoftAdam(resumed, lr=0.1)
    again.load_state_dict(saved)
    assert all(set(s) == ADAMW_KEYS for s in again.state.values())
    # A 0-dim mean of a whole tensor is the mean of the v beside it: bit for bit, as before.
    run(again, resumed, 3, seed=2)
    for p, q in zip(resumed, params):
        assert torch.equal(p, q)
    # A per-piece vector (FSDP1 FlatParameters, DeepSpeed partitions) belongs to the layout
    # that wrote it: dropped, and rebuilt by the rule.
    foreign = copy.deepcopy(saved)
    foreign["state"][0]["exp_avg_sq_mean"] = torch.tensor([1.0, 2.0], dtype=torch.float64)
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    third = SoftAdam(fresh, lr=0.1)
    third.load_state_dict(foreign)
    assert rebuilt_means(third, fresh)[0] == pytest.approx(the_rule(saved)[0], rel=RULE_RTOL, abs=0)


def test_a_change_of_v_outside_step_is_noticed_or_rebuilt_on_request() -> None:
    params = make_params()
    opt = SoftAdam(params, lr=0.1, fused=True)
    run(opt, params, 3)
    # An in-place torch operation bumps v's version counter: noticed.
    for p in params:
        opt.state[p]["exp_avg_sq"].mul_(4.0)
    want = [float(opt.state[p]["exp_avg_sq"].double().mean()) for p in params]
    assert rebuilt_means(opt, params) == pytest.approx(want, rel=RULE_RTOL, abs=0)
    # A write through .data is not: rebuild_exp_avg_sq_means() says so (fairseq's BMUF
    # averaging calls it).
    for p in params:
        opt.state[p]["exp_avg_sq"].data.mul_(4.0)
    want = [float(opt.state[p]["exp_avg_sq"].double().mean()) for p in params]
    assert rebuilt_means(opt, params) != pytest.approx(want, rel=1e-3)
    opt.rebuild_exp_avg_sq_means()
    want = [float(opt.state[p]["exp_avg_sq"].double().mean()) for p in params]
    assert rebuilt_means(opt, params) == pytest.approx(want, rel=RULE_RTOL, abs=0)


def test_a_step_counter_shared_in_a_loaded_state_becomes_each_tensors_own() -> None:
    # FSDP1's full optimizer state gives every tensor of a FlatParameter one 0-dim step
    # tensor, and torch's load_state_dict keeps it (AdamW then advances it once per tensor).
    params = make_params()
    opt = SoftAdam(params, lr=0.1)
    run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    shared = saved["state"][0]["step"]
    for state in saved["state"].values():
        state["step"] = shared
    again = SoftAdam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1)
    again.load_state_dict(saved)
    steps = [state["step"] for state in again.state.values()]
    assert len({id(s) for s in steps} | {id(shared)}) == 4
    first = again.param_groups[0]["params"][0]
    first.grad = torch.ones_like(first)  # only the first tensor has a gradient
    again.step()
    assert [float(s) for s in steps] == [3.0, 2.0, 2.0] and float(shared) == 2.0


# --- every engine's own route, 2 ranks and one process ------------------------------------


def launch(phase: str, ranks: int, out: Path) -> dict:
    result = run_under_torchrun(
        "tests/checkpoint_routes_worker.py", phase, out, ranks=ranks, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return torch.load(out / f"results-{phase}.pt", weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("deepspeed", reason="DeepSpeed is part of the pinned environment (make setup)")
    out = tmp_path_factory.mktemp("checkpoints")
    return {**launch("save", 2, out), **launch("load", 1, out)}


SOFTADAM = [name for name in OPTIMIZERS if name != "adamw"]
ROUTES = (
    [f"2to2-fsdp1-orig{orig}-{kind}" for orig, kind in FSDP1_ROUTES]
    + [f"2to1-fsdp1-orig{orig}-{kind}" for orig, kind in FSDP1_ROUTES]
    + ["2to2-fsdp2-sharded"]
    + [f"2to1-fsdp2-{kind}" for kind in FSDP2_ROUTES]
    + [f"2to2-zero{stage}" for stage in ZERO_STAGES]
    + [f"2to1-universal-zero{stage}" for stage in ZERO_STAGES]
)


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_continues_exactly_in_every_execution(results: dict, route: str) -> None:
    for name in SOFTADAM:
        error = results[f"{route}-{name}"]
        assert error <= RTOL, f"{name}: relative error {error:.2e} after resuming"
        assert results[f"shapes-{route}-{name}"], f"{name}: the loaded state is not in the target's own form"


def test_fsdp1_gathers_and_scatters_softadams_state_as_adamws(results: dict) -> None:
    # Before the means left the state, FSDP.optim_state_dict crashed on every rank with
    # use_orig_params=False under both state dict types (gloo: "allgather: invalid tensor size").
    for orig, kind in FSDP1_ROUTES:
        for name in OPTIMIZERS:
            assert results[f"save-fsdp1-orig{orig}-{kind}-{name}"] == "ok"


def test_the_rebuilt_means_follow_the_rule_on_sharded_tensors(results: dict) -> None:
    for name in SOFTADAM:
        assert results[f"rebuild-2to2-fsdp2-sharded-{name}"] <= RULE_RTOL


def test_adamw_through_the_same_routes(results: dict) -> None:
    """The control. One route resumes AdamW wrongly, torch's doing: FSDP1's full optimizer
    state with use_orig_params=False gives the tensors of a FlatParameter one shared step
    tensor, which the unwrapped AdamW then advances once per tensor. The test fails if that
    changes, so that docs/distributed.md can say so."""
    for route in ROUTES:
        error = results[f"{route}-adamw"]
        if route == "2to1-fsdp1-origFalse-full":
            assert error > 1e-3
        else:
            assert error <= RTOL, f"{route}: relative error {error:.2e}"


def test_deepspeeds_plain_load_checkpoint_refuses_a_new_world_size_for_adamw_too(results: dict) -> None:
    for stage in ZERO_STAGES:
        for name in OPTIMIZERS:
            outcome = results[f"2to1-plain-zero{stage}-{name}"]
            assert "used a DP world size of 2 but the current world size is 1" in outcome, outcome
