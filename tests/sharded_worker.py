"""Run by tests/test_sharded.py under torchrun (2 processes, gloo, CPU).

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/sharded_worker.py OUT_DIR

Trains the small model of ``build_model`` (an embedding, two linears, a layer norm: 349
elements, so that shards are uneven and some ranks hold nothing of some tensors) for
STEPS SoftAdam steps under each FSDP1 and DeepSpeed setting and each execution, on this
rank's half of every batch, and compares the full parameters after every step with one
process on the combined batch (computed here, on every rank, without any wrapper). Rank 0
writes OUT_DIR/results.pt: case -> the largest relative error over the steps, plus what
the refusal and non-finite cases did on each rank. Saving and resuming are
tests/checkpoint_routes_worker.py's.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from softadam_nlp import SoftAdam

STEPS = 5
BATCH = 8
LR = 0.1
EXECUTIONS = {
    "per-tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "default": {},
}
CLIP = 1.0  # below the gradient norm of every step of this model (1.2 to 1.7), so clipping acts


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 5),
        torch.nn.Linear(5, 21),
        torch.nn.Tanh(),
        torch.nn.Linear(21, 7),
        torch.nn.LayerNorm(7),
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 11, (BATCH, 3), generator=g), torch.randn(BATCH, 3, 7, generator=g)) for _ in range(STEPS)
    ]


def param_groups(model: torch.nn.Module, grouped: bool | str) -> list[dict]:
    """One group, or two (weight decay and a lower rate on the matrices, none elsewhere), or
    with ``"tail"`` the last three tensors (3.bias and the layer norm, 21 elements, all in the
    second half of a flattened model) in a group of their own."""
    named = list(model.named_parameters())
    if not grouped:
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    if grouped == "tail":
        return [
            {"params": [p for _, p in named[:-3]], "param_names": [n for n, _ in named[:-3]]},
            {"params": [p for _, p in named[-3:]], "param_names": [n for n, _ in named[-3:]], "lr": LR / 2},
        ]
    decay = [(n, p) for n, p in named if p.dim() > 1]
    rest = [(n, p) for n, p in named if p.dim() <= 1]
    return [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": 0.1, "lr": LR / 2},
        {"params": [p for _, p in rest], "param_names": [n for n, _ in rest]},
    ]


def loss_of(model: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(inputs), targets)


def share(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    half = BATCH // 2
    return tensor[rank * half : (rank + 1) * half]


def reference(execution: dict, grouped: bool | str = False, clip: float | None = None) -> list[dict[str, torch.Tensor]]:
    """One process, no wrapper, the combined batch."""
    model = build_model()
    optimizer = SoftAdam(param_groups(model, grouped), lr=LR, **execution)
    snapshots = []
    for inputs, targets in batches():
        optimizer.zero_grad()
        loss_of(model, inputs, targets).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots


def relative_error(ours: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> float:
    """The largest relative error of any parameter after any step (both runs as long)."""
    assert len(ours) == len(want) > 0
    worst = 0.0
    for got, expected in zip(ours, want):
        assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
        for name, value in expected.items():
            worst = max(worst, float((got[name] - value).abs().max() / value.abs().max()))
    return worst


# --- FSDP1 -------------------------------------------------------------------------------


def fsdp1_model(strategy: str, use_orig_params: bool, per_module: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({torch.nn.Linear, torch.nn.Embedding}) if per_module else None
    return FSDP(
        build_model(),
        sharding_strategy=getattr(ShardingStrategy, strategy),
        use_orig_params=use_orig_params,
        auto_wrap_policy=policy,
        device_id=torch.device("cpu"),
    )


def fsdp1_full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return {clean(n): p.detach().clone() for n, p in model.named_parameters()}


def clean(name: str) -> str:
    """The original module's parameter name, without FSDP's wrapper prefixes."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def train_fsdp1(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> list[dict[str, torch.Tensor]]:
    snapshots = []
    for inputs, targets in batches():
        optimizer.zero_grad()
        loss_of(model, share(inputs, rank), share(targets, rank)).backward()
        optimizer.step()
        snapshots.append(fsdp1_full_parameters(model))
    return snapshots


FSDP1_SETTINGS = [
    (strategy, orig, per_module)
    for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
    for orig in (False, True)
    for per_module in (False, True)
]


def fsdp1_case(strategy: str, orig: bool, per_module: bool) -> str:
    return f"fsdp1-{strategy}-orig{orig}-{'per-module' if per_module else 'root'}"


# --- DeepSpeed -----------------------------------------------------------------------------


def deepspeed_engine(stage: int, grouped: bool, clip: float | None, execution: dict):
    import deepspeed

    model = build_model()
    optimizer = SoftAdam(param_groups(model, grouped), lr=LR, **execution)
    config = {
        "train_micro_batch_size_per_gpu": BATCH // 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip or 0.0,
        "steps_per_print": 10**9,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, model, optimizer


def deepspeed_full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # ZeRO-1/2 keep every model parameter whole on every rank (the fp32 partitions are
    # copied back and all-gathered after each step).
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_deepspeed(engine, model: torch.nn.Module, rank: int, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    snapshots = []
    for inputs, targets in batches()[:steps]:
        loss = loss_of(engine, share(inputs, rank), share(targets, rank))
        engine.backward(loss)
        engine.step()
        snapshots.append(deepspeed_full_parameters(model))
    return snapshots


DEEPSPEED_SETTINGS = [(stage, grouped, clip) for stage in (1, 2) for grouped in (False, True) for clip in (None, CLIP)]


def deepspeed_case(stage: int, grouped: bool, clip: float | None) -> str:
    return f"zero{stage}-{'two-groups' if grouped else 'one-group'}-{'clip' if clip else 'noclip'}"


# --- the cases ---------------------------------------------------------------------------------


def outcome_of(step: Callable[[], object]) -> str:
    try:
        step()
        return "stepped"
    except ValueError as error:
        return str(error)


def nonfinite_fsdp1(rank: int, orig: bool) -> dict[str, object]:
    """A NaN in one element of rank 1's shard only: every rank must refuse, unchanged."""
    model = fsdp1_model("FULL_SHARD", orig, per_module=False)
    optimizer = SoftAdam(model.parameters(), lr=LR)
    train_fsdp1(model, optimizer, rank)
    before = fsdp1_full_parameters(model)
    inputs, targets = batches()[0]
    optimizer.zero_grad()
    loss_of(model, share(inputs, rank), share(targets, rank)).backward()
    if rank == 1:
        grad = next(p.grad for p in model.parameters() if p.grad is not None and p.grad.numel())
        grad.view(-1)[0] = float("nan")
    outcome = outcome_of(optimizer.step)
    after = fsdp1_full_parameters(model)
    return {"outcome": outcome, "unchanged": all(torch.equal(before[k], v) for k, v in after.items())}


def nonfinite_deepspeed(rank: int, stage: int) -> dict[str, object]:
    engine, model, optimizer = deepspeed_engine(stage, grouped=True, clip=None, execution={})
    train_deepspeed(engine, model, rank, steps=2)
    before = deepspeed_full_parameters(model)
    inputs, targets = batches()[2]
    loss = loss_of(engine, share(inputs, rank), share(targets, rank))
    engine.backward(loss)
    flat = optimizer.param_groups[0]["params"][0]  # this rank's fp32 partition of group 0

    def poisoned_step() -> None:
        # DeepSpeed hands SoftAdam the partition's gradient inside engine.step(); poison it
        # on rank 1 only, between DeepSpeed's own work and SoftAdam's step.
        step = optimizer.step

        def step_with_nan(*args, **kwargs):
            if rank == 1:
                flat.grad.view(-1)[0] = float("nan")
            return step(*args, **kwargs)

        optimizer.step = step_with_nan
        try:
            engine.step()
        finally:
            del optimizer.step

    outcome = outcome_of(poisoned_step)
    after = deepspeed_full_parameters(model)
    return {"outcome": outcome, "unchanged": all(torch.equal(before[k], v) for k, v in after.items())}


def refusal_zero3(rank: int) -> str:
    try:
        engine, _, _ = deepspeed_engine(3, grouped=False, clip=None, execution={})
    except ValueError as error:  # refused at initialize
        return str(error)
    inputs, targets = batches()[0]
    engine.backward(loss_of(engine, share(inputs, rank), share(targets, rank)))
    return outcome_of(engine.step)


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    import logging

    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    references = {name: reference(execution) for name, execution in EXECUTIONS.items()}

    for setting in FSDP1_SETTINGS:
        for name, execution in EXECUTIONS.items():
            model = fsdp1_model(*setting)
            optimizer = SoftAdam(model.parameters(), lr=LR, **execution)
            results[f"{fsdp1_case(*setting)}-{name}"] = relative_error(
                train_fsdp1(model, optimizer, rank), references[name]
            )
    # Two param groups over use_orig_params views, the second all in rank 1's shard: rank 0
    # steps nothing of it, and must still take part in its all-reduce.
    for name, execution in EXECUTIONS.items():
        model = fsdp1_model("FULL_SHARD", True, per_module=False)
        optimizer = SoftAdam(param_groups(model, grouped="tail"), lr=LR, **execution)
        results[f"fsdp1-two-groups-{name}"] = relative_error(
            train_fsdp1(model, optimizer, rank), reference(execution, grouped="tail")
        )

    with quiet_deepspeed():
        for setting in DEEPSPEED_SETTINGS:
            stage, grouped, clip = setting
            for name, execution in EXECUTIONS.items():
                engine, model, _ = deepspeed_engine(stage, grouped, clip, execution)
                results[f"{deepspeed_case(*setting)}-{name}"] = relative_error(
                    train_deepspeed(engine, model, rank), reference(execution, grouped, clip)
                )

        for orig in (False, True):
            results[f"nonfinite-fsdp1-orig{orig}-rank{rank}"] = nonfinite_fsdp1(rank, orig)
        for stage in (1, 2):
            results[f"nonfinite-zero{stage}-rank{rank}"] = nonfinite_deepspeed(rank, stage)
        results[f"refusal-zero3-rank{rank}"] = refusal_zero3(rank)

    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {}
        for per_rank in gathered:
            for key, value in per_rank.items():
                if "-rank" in key or key not in merged:
                    merged[key] = value
                else:  # the error seen on the worse rank
                    merged[key] = max(merged[key], value)
        torch.save(merged, out / "results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(Path(sys.argv[1]))
