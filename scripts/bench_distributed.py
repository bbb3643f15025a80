"""The optimizer step's cost under each distributed engine: SoftAdam against AdamW under the same engine.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 \
        scripts/bench_distributed.py --json results/bench/distributed_cpu.json

For every engine (DDP, FSDP2, FSDP1 with and without use_orig_params, DeepSpeed ZeRO-1 and
ZeRO-2) it builds the same transformer encoder, trains it for a few warm-up steps, then
times STEPS optimizer steps per round (``optimizer.step()``; under DeepSpeed
``engine.step()``, which also copies the partitions back and all-gathers them), for
torch's AdamW (its default execution, and fused=True) and SoftAdam (default execution) in
alternating rounds, so all see the same machine load. Rank 0 prints a markdown table of
the medians and of SoftAdam over each AdamW per engine, and writes them to --json.
SoftAdam's extra cost under the sharded engines is its one all-reduce of the per-tensor
sums of g^2 per param group and step (layout.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from softadam_nlp import SoftAdam

ENGINES = ("ddp", "fsdp2", "fsdp1", "fsdp1-orig", "zero1", "zero2")
OPTIMIZERS = ("adamw", "adamw-fused", "softadam")


def build_model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(
        torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), torch.nn.Linear(width, width)
    )


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "softadam":
        return SoftAdam(params, lr=1e-2)  # the default execution: the fused kernel on CPU tensors
    return torch.optim.AdamW(params, lr=1e-4, fused=name == "adamw-fused" or None)


def wrapped(engine: str, optimizer_name: str, width: int, layers: int) -> tuple[Callable, Callable, int]:
    """(one training step without the optimizer step, the optimizer step, parameters in the model)."""
    model = build_model(width, layers)
    numel = sum(p.numel() for p in model.parameters())
    if engine.startswith("zero"):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 8,
            "zero_optimization": {"stage": int(engine[-1])},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        optimizer = make_optimizer(optimizer_name, model.parameters())
        with contextlib.redirect_stdout(io.StringIO()):
            ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def backward(x: torch.Tensor) -> None:
            ds_engine.backward(ds_engine(x).square().mean())

        return backward, ds_engine.step, numel
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model[0].layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(
            model,
            use_orig_params=engine == "fsdp1-orig",
            device_id=torch.device("cpu"),
            auto_wrap_policy=ModuleWrapPolicy({torch.nn.TransformerEncoderLayer}),
        )
    optimizer = make_optimizer(optimizer_name, model.parameters())

    def backward(x: torch.Tensor) -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()

    return backward, optimizer.step, numel


def time_rounds(engine: str, width: int, layers: int, rounds: int, steps: int, warmup: int) -> tuple[dict, int]:
    runs = {name: wrapped(engine, name, width, layers) for name in OPTIMIZERS}
    x = torch.randn(8, 16, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    for backward, step, _ in runs.values():
        for _ in range(warmup):
            backward(x)
            step()
    per_round: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for _ in range(rounds):
        for name, (backward, step, _) in runs.items():
            total = 0.0
            for _ in range(steps):
                backward(x)
                dist.barrier()
                started = time.perf_counter()
                step()
                dist.barrier()
                total += time.perf_counter() - started
            per_round[name].append(1e3 * total / steps)
    return per_round, runs["adamw"][2]


def profile_softadam(engine: str, args: argparse.Namespace) -> None:
    """cProfile of SoftAdam's steps (rank 0), per step: the functions that take the most time."""
    import cProfile
    import pstats

    backward, step, _ = wrapped(engine, "softadam", args.width, args.layers)
    x = torch.randn(8, 16, args.width, generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(args.warmup):
        backward(x)
        step()
    profiler = cProfile.Profile()
    steps = args.rounds * args.steps_per_round
    for _ in range(steps):
        backward(x)
        dist.barrier()
        profiler.enable()
        step()
        profiler.disable()
    if dist.get_rank() == 0:
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ..., total, cumulative, ...)
        rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:8]
        print(f"  {engine}, SoftAdam, ms per step by own time (cProfile, rank 0, {steps} steps):")
        for (file, line, name), (_, calls, own, cumulative, _) in rows:
            print(
                f"    {1e3 * own / steps:7.2f} own {1e3 * cumulative / steps:7.2f} cumulative  "
                f"{calls // steps:5d} calls  {Path(file).name}:{line}({name})"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--width", type=int, default=256, help="model width (default 256: 6.3M parameters with 8 layers)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile SoftAdam's steps (cProfile, rank 0) under each engine and print where time goes",
    )
    args = p.parse_args()
    if min(args.width, args.layers, args.rounds, args.steps_per_round) < 1 or args.width % 4:
        p.error("--width (a multiple of 4), --layers, --rounds and --steps-per-round must be >= 1")
    dist.init_process_group("gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    rank = dist.get_rank()
    record: dict = {
        "command": " ".join(["torchrun --nproc-per-node", str(dist.get_world_size()), *sys.argv]),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} "
        f"thread(s) per process, {dist.get_world_size()} processes (gloo)",
        "torch": torch.__version__,
        "engines": {},
    }
    for engine in args.engines:
        per_round, numel = time_rounds(engine, args.width, args.layers, args.rounds, args.steps_per_round, args.warmup)
        medians = {name: statistics.median(values) for name, values in per_round.items()}
        record["parameters"] = numel
        record["engines"][engine] = {
            "per_round_ms": per_round,
            "median_ms": medians,
            "softadam_over_adamw": medians["softadam"] / medians["adamw"],
            "softadam_over_adamw_fused": medians["softadam"] / medians["adamw-fused"],
        }
        if rank == 0:
            print(f"{engine}: " + ", ".join(f"{name} {value:.2f} ms" for name, value in medians.items()), flush=True)
        if args.profile:
            profile_softadam(engine, args)
    if rank == 0:
        print(
            "\n| engine | AdamW step (ms) | AdamW fused (ms) | SoftAdam step (ms) | SoftAdam / AdamW | "
            "SoftAdam / AdamW fused |\n|---|---|---|---|---|---|"
        )
        for engine, row in record["engines"].items():
            m = row["median_ms"]
            print(
                f"| {engine} | {m['adamw']:.2f} | {m['adamw-fused']:.2f} | {m['softadam']:.2f} | "
                f"{row['softadam_over_adamw']:.2f} | {row['softadam_over_adamw_fused']:.2f} |"
            )
        print(f"\n{record['parameters']:,} parameters; medians of {args.rounds} rounds of {args.steps_per_round} steps")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
