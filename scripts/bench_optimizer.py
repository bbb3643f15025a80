#!/usr/bin/env python
"""Time one optimizer step on the parameter shapes of fairseq's transformer_iwslt_de_en.

Every optimizer gets its own copy of the parameters (and the same fixed gradients);
rounds interleave the optimizers so that they see the same machine load, and the
report gives per-step medians and their ratio to torch's fused AdamW measured in the
same run. The result is a Markdown table on stdout and, with --json, a record file.

    python scripts/bench_optimizer.py --json results/bench/optimizer_step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from softadam_nlp import SoftAdam

# Defaults of SoftAdam and of the update the baselines mirror.
LR, BETAS, EPS, ETA, WEIGHT_DECAY = 0.1, (0.9, 0.999), 1e-8, 1.0, 1e-4


def transformer_iwslt_de_en_shapes(vocab_size: int) -> list[torch.Size]:
    """Parameter shapes of fairseq's transformer_iwslt_de_en with --share-all-embeddings."""
    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, transformer_iwslt_de_en

    dictionary = Dictionary()
    for i in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"tok{i}")
    args = argparse.Namespace(share_all_embeddings=True)
    transformer_iwslt_de_en(args)

    class Task:
        source_dictionary = target_dictionary = dictionary

    model = TransformerModel.build_model(args, Task())
    return [p.shape for p in model.parameters()]


class PaperLoop:
    """The paper's update as a straightforward per-tensor loop: the baseline to beat.

    Deliberately naive (out-of-place temporaries, Python scalars), as one would first
    transcribe Algorithm 1; it is not used anywhere but in this benchmark.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = BETAS
        b2t = min(b2, 1 - 1 / self.t)
        gamma = math.sqrt((1 - b2) / (1 - b2t))
        for p, (m, v) in zip(self.params, self.state):
            g = p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2t).add_((1 - b2t) * g * g)
            d = 1 + ETA - ETA * gamma + ETA * gamma * torch.sqrt(v / (v.mean() + EPS**2))
            p.mul_(1 - LR * WEIGHT_DECAY)
            p.sub_(LR * (1 + ETA) * m / d)


def build_optimizers(shapes: list[torch.Size], grads: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """name -> a zero-argument step function, each over its own parameter copy."""

    def params() -> list[torch.Tensor]:
        ps = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    return {
        "SoftAdam (default path)": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY).step,
        "SoftAdam per-tensor": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, foreach=False).step,
        "SoftAdam foreach": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, foreach=True).step,
        "paper per-tensor loop": PaperLoop(params()).step,
        "AdamW foreach": torch.optim.AdamW(params(), lr=1e-3, weight_decay=WEIGHT_DECAY, foreach=True).step,
        "AdamW fused": torch.optim.AdamW(params(), lr=1e-3, weight_decay=WEIGHT_DECAY, fused=True).step,
        "SGD momentum": torch.optim.SGD(params(), lr=LR, momentum=0.9).step,
    }


def default_softadam_path(device: torch.device) -> str:
    from torch.optim.optimizer import _default_to_fused_or_foreach

    p = torch.zeros(1, device=device)
    _, foreach = _default_to_fused_or_foreach([p], differentiable=False, use_fused=False)
    return "foreach" if foreach else "per-tensor"


def machine_description() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=10152,
                        help="shared source/target dictionary size (default: 10152, the joined IWSLT'14 "
                             "De-En dictionary with 10k BPE merges)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--steps-per-round", type=int, default=5, help="steps timed per optimizer per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    shapes = transformer_iwslt_de_en_shapes(args.vocab_size)
    n_params = sum(math.prod(s) for s in shapes)
    print(f"transformer_iwslt_de_en shapes: {n_params:,} parameters in {len(shapes)} tensors "
          f"(vocab {args.vocab_size:,}); {torch.get_num_threads()} threads", flush=True)
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    steps = build_optimizers(shapes, grads)
    for step in steps.values():
        for _ in range(args.warmup):
            step()

    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            times[name].append((time.perf_counter() - start) / args.steps_per_round * 1e3)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    reference = medians["AdamW fused"]
    default_path = default_softadam_path(torch.device("cpu"))
    print(f"\nSoftAdam's default path on CPU: {default_path}\n")
    print("| optimizer | median ms/step | x fused AdamW |")
    print("|---|---:|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median:.1f} | {median / reference:.2f} |")

    if args.json:
        record = {
            "command": "python scripts/bench_optimizer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "model": {"name": "transformer_iwslt_de_en", "vocab_size": args.vocab_size,
                      "parameters": n_params, "tensors": len(shapes)},
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "softadam_default_path": default_path,
            "median_ms_per_step": medians,
            "ratio_to_fused_adamw": {k: v / reference for k, v in medians.items()},
            "per_round_ms": times,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
