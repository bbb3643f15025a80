"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR

Trains the small model of ``build_model`` for a few SoftAdam steps under DDP and under
FSDP2 (``fully_shard``, parameters sharded as DTensors) with each execution, on this
rank's half of every batch, and writes the resulting full parameters (rank 0) to
OUT_DIR/<case>.pt for the test to compare against one process on the whole batch. It
also records, per rank, what a step with a non-finite gradient on one rank did.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

# The fused GPU execution runs on these CPU shards through Triton's interpreter, which
# must be chosen before anything imports triton.
GPU_EXECUTION_ON_CPU = importlib.util.find_spec("triton") is not None
if GPU_EXECUTION_ON_CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from softadam_nlp import SoftAdam  # noqa: E402

STEPS = 5
BATCH = 8
EXECUTIONS = {
    "per-tensor": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
    "default": {},
}


def build_model() -> torch.nn.Module:
    """A 2-layer transformer encoder with a head; uneven sizes, so shards differ in size."""
    torch.manual_seed(0)
    layer = dict(d_model=12, nhead=2, dim_feedforward=21, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(
        torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(**layer), num_layers=2, enable_nested_tensor=False
        ),
        torch.nn.Linear(12, 7),
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, 12, generator=g), torch.randn(BATCH, 5, 7, generator=g)) for _ in range(STEPS)]


def train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int | None, world: int = 2
) -> list[dict[str, torch.Tensor]]:
    """STEPS steps; with a rank, on that rank's contiguous share of each batch. Returns the
    full parameters after every step."""
    snapshots = []
    for inputs, targets in batches():
        if rank is not None:
            share = BATCH // world
            inputs, targets = inputs[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        snapshots.append(full_parameters(getattr(model, "module", model)))
    return snapshots


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


@contextlib.contextmanager
def counting_fused_steps() -> Iterator[list[int]]:
    """Counts the calls of the fused CPU execution while the block runs."""
    module = importlib.import_module("softadam_nlp.softadam")
    calls, fused = [0], module._fused_softadam

    def counted(*args, **kwargs):
        calls[0] += 1
        return fused(*args, **kwargs)

    module._fused_softadam = counted
    try:
        yield calls
    finally:
        module._fused_softadam = fused


def fsdp_model(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for layer in model[0].layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    results: dict[str, object] = {}
    model = DistributedDataParallel(build_model())
    results["ddp"] = train(model, SoftAdam(model.parameters(), lr=0.01), rank)

    for name, execution in EXECUTIONS.items():
        model = fsdp_model(mesh)
        optimizer = SoftAdam(model.parameters(), lr=0.01, **execution)
        with counting_fused_steps() as fused_steps:
            results[f"fsdp2-{name}"] = train(model, optimizer, rank)
        results[f"fsdp2-{name}-ran-fused"] = fused_steps[0] > 0

    if GPU_EXECUTION_ON_CPU:
        # The fused GPU execution on the local shards (interpreted here): the same whole-tensor
        # means from the all-reduced sums; with nonfinite="skip" a NaN on one rank makes every
        # rank's device flag refuse the step.
        softadam_module = importlib.import_module("softadam_nlp.softadam")
        softadam_module._TRITON_ON_CPU = True
        try:
            model = fsdp_model(mesh)
            optimizer = SoftAdam(model.parameters(), lr=0.01, fused=True, nonfinite="skip")
            results["fsdp2-fused-gpu"] = train(model, optimizer, rank)
            results["fsdp2-fused-gpu-step-on-device"] = all(
                p in optimizer._kept_means and state["step"].item() == STEPS for p, state in optimizer.state.items()
            )
            before = full_parameters(model)
            inputs, targets = batches()[0]
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            if rank == 1:
                model[1].weight.grad.to_local()[0, 0] = float("nan")
            optimizer.step()
            results[f"fsdp2-fused-gpu-skip-rank{rank}"] = (
                all(torch.equal(before[k], v) for k, v in full_parameters(model).items()),
                optimizer.skipped_steps,
            )
            skipped = torch.tensor([optimizer.skipped_steps])
            dist.all_reduce(skipped)
            results["fsdp2-fused-gpu-skipped-on-both"] = skipped.item() == 2
        finally:
            softadam_module._TRITON_ON_CPU = False

    # A NaN in one element of one rank's shard: every rank must refuse the step, unchanged.
    model = fsdp_model(mesh)
    optimizer = SoftAdam(model.named_parameters(), lr=0.01)
    train(model, optimizer, rank)
    before = full_parameters(model)
    inputs, targets = batches()[0]
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    weight = model[1].weight
    if rank == 1:
        weight.grad.to_local()[0, 0] = float("nan")
    try:
        optimizer.step()
        outcome = "stepped"
    except ValueError as error:
        outcome = str(error)
    unchanged = all(torch.equal(before[k], v) for k, v in full_parameters(model).items())
    (out / f"nonfinite-rank{rank}.txt").write_text(f"{outcome}\nunchanged={unchanged}\n")

    # DDP: a NaN in rank 1's half of the batch reaches every rank through DDP's all-reduce
    # of the gradients, so every rank refuses the same step (no collective of SoftAdam's).
    model = DistributedDataParallel(build_model())
    optimizer = SoftAdam(model.module.named_parameters(), lr=0.01)
    before = full_parameters(model.module)
    inputs, targets = batches()[0]
    share = BATCH // 2
    inputs = inputs[rank * share : (rank + 1) * share].clone()
    if rank == 1:
        inputs[0, 0, 0] = float("nan")
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(inputs), targets[rank * share : (rank + 1) * share]).backward()
    try:
        optimizer.step()
        outcome = "stepped"
    except ValueError as error:
        outcome = str(error)
    unchanged = all(torch.equal(before[k], v) for k, v in full_parameters(model.module).items())
    (out / f"nonfinite-ddp-rank{rank}.txt").write_text(f"{outcome}\nunchanged={unchanged}\n")

    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
