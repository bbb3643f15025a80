#!/usr/bin/env python
"""Time one optimizer step on the parameter shapes of a model (--workload):

- ``transformer`` (default): fairseq's transformer_iwslt_de_en, 36.7M parameters in 253 tensors;
- ``awd_lstm``: the paper's 3-layer AWD-LSTM for PTB (the recipe's sizes), 24M in 14 tensors;
- ``single``: one tensor of 100M elements;
- ``gpt2_1p3b``: a GPT-2-shaped model of GPT-3 XL's sizes (24 layers, d_model 2048, 4x MLP,
  vocabulary 50257, 2048 positions, tied embedding), 1.32B parameters in 292 tensors.

Every optimizer gets its own copy of the parameters (and the same fixed gradients);
rounds interleave the optimizers so that they see the same machine load, and the
report gives per-step medians and their ratio to torch's fused AdamW measured in the
same run. The result is a Markdown table on stdout and, with --json, a record file.
--first-step also times what SoftAdam's fused kernel costs before its first step, in
fresh processes: building it into an empty cache, and loading it from the cache.

    python scripts/bench_optimizer.py --workload transformer --first-step \
        --json results/bench/optimizer_step_cpu_transformer.json

--device cuda steps parameters on the GPU instead and compares SoftAdam's default
execution there (the record's softadam_default_path names it), foreach, fused (the fused
GPU execution), torch's fused AdamW and SGD with momentum (foreach); each step is timed
between two torch.cuda.synchronize calls, and the first step of every execution (for
the fused one: compiling its kernels) is recorded apart:

    python scripts/bench_optimizer.py --device cuda --workload gpt2_1p3b --json optimizer_step_cuda_gpt2_1p3b.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from softadam_nlp import SoftAdam
from softadam_nlp._fused import fused_cpu_kernel

REPO = Path(__file__).resolve().parents[1]

# Defaults of SoftAdam and of the update the baselines mirror.
LR, BETAS, EPS, ETA, WEIGHT_DECAY = 0.1, (0.9, 0.999), 1e-8, 1.0, 1e-4


def transformer_iwslt_de_en_shapes(vocab_size: int) -> list[torch.Size]:
    """Parameter shapes of fairseq's transformer_iwslt_de_en with --share-all-embeddings, in
    the order of its model.parameters(). Listed by hand, so that the benchmark runs where
    fairseq is not installed (the GPU machine); tests/test_gpu_check.py compares them with
    the model fairseq builds."""
    d, ffn, layers = 512, 1024, 6
    attention = [(d, d), (d,)] * 4  # k, v, q and out projections: weight, bias
    layer_norm = [(d,), (d,)]
    feed_forward = [(ffn, d), (ffn,), (d, ffn), (d,)]
    encoder_layer = attention + layer_norm + feed_forward + layer_norm
    decoder_layer = attention + layer_norm + attention + layer_norm + feed_forward + layer_norm  # self, encoder attn
    shapes = [(vocab_size, d)] + encoder_layer * layers + decoder_layer * layers  # one embedding, shared
    return [torch.Size(s) for s in shapes]


def gpt2_shapes(layers: int, d_model: int, vocab_size: int, positions: int) -> list[torch.Size]:
    """Parameter shapes of transformers' GPT2LMHeadModel, in the order of its parameters():
    token and position embeddings, then per block ln_1, attn.c_attn, attn.c_proj, ln_2,
    mlp.c_fc, mlp.c_proj (Conv1D weights are in x out), then ln_f. The LM head is tied to
    the token embedding, so it is no parameter of its own. Plain shapes: no model is built."""
    d, mlp = d_model, 4 * d_model
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, mlp), (mlp,), (mlp, d), (d,)]
    return [torch.Size(s) for s in [(vocab_size, d), (positions, d), *block * layers, (d,), (d,)]]


# GPT-3 XL's sizes (Brown et al. 2020, Table 2.1) in GPT-2's layout: 1,315,723,264 parameters.
GPT2_1P3B = {"layers": 24, "d_model": 2048, "vocab_size": 50257, "positions": 2048}


def awd_lstm_shapes() -> list[torch.Size]:
    """Parameter shapes of the paper's PTB model (the AWD-LSTM recipe: 400/1150, 3 layers, tied decoder)."""
    from softadam_nlp.models.awd_lstm import AWDLSTMConfig, AWDLSTMForLanguageModeling

    return [p.shape for p in AWDLSTMForLanguageModeling(AWDLSTMConfig()).parameters()]


WORKLOADS: dict[str, Callable[[argparse.Namespace], list[torch.Size]]] = {
    "transformer": lambda args: transformer_iwslt_de_en_shapes(args.vocab_size),
    "awd_lstm": lambda args: awd_lstm_shapes(),
    "single": lambda args: [torch.Size([100_000_000])],
    "gpt2_1p3b": lambda args: gpt2_shapes(**GPT2_1P3B),
    "tiny": lambda args: [torch.Size([64, 32]), torch.Size([32]), torch.Size([10])],  # the script's own test
}


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


def build_optimizers(
    shapes: list[torch.Size], grads: list[torch.Tensor], device: torch.device | None = None
) -> dict[str, Callable[[], None]]:
    """name -> a zero-argument step function, each over its own parameter copy on `device` (default: CPU)."""
    device = device or torch.device("cpu")

    def params() -> list[torch.Tensor]:
        ps = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    if device.type == "cuda":
        # The default is measured beside the explicit executions on purpose: it is what
        # users get, and it is one of them (softadam_default_path says which).
        return {
            "SoftAdam (default path)": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY).step,
            "SoftAdam foreach": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, foreach=True).step,
            "SoftAdam fused": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, fused=True).step,
            "AdamW fused": torch.optim.AdamW(params(), lr=1e-3, weight_decay=WEIGHT_DECAY, fused=True).step,
            "SGD momentum": torch.optim.SGD(params(), lr=LR, momentum=0.9, foreach=True).step,
        }
    kernel = fused_cpu_kernel()
    return {
        "SoftAdam (default path)": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY).step,
        "SoftAdam fused": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, fused=True).step,
        "SoftAdam per-tensor": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, foreach=False).step,
        "SoftAdam foreach": SoftAdam(params(), lr=LR, eta=ETA, weight_decay=WEIGHT_DECAY, foreach=True).step,
        "paper per-tensor loop": PaperLoop(params()).step,
        "AdamW foreach": torch.optim.AdamW(params(), lr=1e-3, weight_decay=WEIGHT_DECAY, foreach=True).step,
        "AdamW fused": torch.optim.AdamW(params(), lr=1e-3, weight_decay=WEIGHT_DECAY, fused=True).step,
        "SGD momentum": torch.optim.SGD(params(), lr=LR, momentum=0.9).step,
        # Not an optimizer: one read of every gradient, the pass SoftAdam needs beyond
        # AdamW's (for mean(g^2)); fused AdamW plus this is SoftAdam's floor where the
        # gradients do not stay in cache between the two passes. torch.dot runs at the
        # memory's read bandwidth here (torch's norm kernels do not: 2.3x slower).
        "read g once (dot)": lambda: [torch.dot(g.view(-1), g.view(-1)) for g in grads],
        # The fused kernel's first pass alone (SoftAdam's extra read), beside the line above.
        **({"SoftAdam grad_sq_sums pass": lambda: kernel.grad_sq_sums(grads)} if kernel is not None else {}),
    }


def ms_per_step(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean milliseconds of `steps` calls of `step`. On CUDA each step is timed between two
    synchronizations, so that the queued kernels are counted, not only their launches."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps * 1e3
    total = 0.0
    for _ in range(steps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        total += time.perf_counter() - start
    return total / steps * 1e3


def default_softadam_path(device: torch.device) -> str:
    """The execution SoftAdam picks by default for parameters on ``device``."""
    p = torch.nn.Parameter(torch.zeros(1, device=device))
    p.grad = torch.zeros(1, device=device)
    opt = SoftAdam([p])
    opt.step()
    if p in opt._kept_means:  # only the fused executions carry a mean of v on whole tensors
        return "fused"
    from torch.optim.optimizer import _default_to_fused_or_foreach

    _, foreach = _default_to_fused_or_foreach([p], differentiable=False, use_fused=False)
    return "foreach" if foreach else "per-tensor"


def write_bench_record(path: Path, script: str, argv: list[str] | None, fields: dict) -> None:
    """A benchmark's JSON record: its command line, the date, the machine, then ``fields``."""
    record = {
        "command": f"python scripts/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "commit": source_commit(),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")


FIRST_STEP = """
import time
start = time.perf_counter()
import torch
from softadam_nlp import SoftAdam
from softadam_nlp._fused import fused_cpu_kernel
w = torch.nn.Parameter(torch.zeros(1000))
w.grad = torch.ones(1000)
imported = time.perf_counter()
SoftAdam([w], fused=True).step()
print(time.perf_counter() - imported)
"""


def first_step_seconds() -> dict[str, float]:
    """Seconds from import to the end of the first fused step, in fresh processes: with an
    empty extension cache (the kernel is compiled) and again with the cache it left."""

    def timed(cache: str) -> float:
        result = subprocess.run(
            [sys.executable, "-c", FIRST_STEP],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TORCH_EXTENSIONS_DIR": cache},
        )
        return float(result.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as cache:
        return {"cold_cache_build": timed(cache), "warm_cache_load": timed(cache)}


def source_commit() -> str:
    """The repository's commit, with "+changes" when tracked files outside results/ (where
    benchmark records are written) differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results") else "")


def machine_description() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine: dict[str, object] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():  # absent on CPU machines, so their records keep their fields
        properties = torch.cuda.get_device_properties(0)
        machine.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1))
        machine.update(cuda=torch.version.cuda, triton=_version_of("triton"))
    return machine


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked; nothing is built or timed (scripts/gpu_check.py's dry run calls this)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="transformer",
        help="whose parameter shapes to step (default: transformer)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the parameters live (default: cpu); cuda compares the executions listed above",
    )
    parser.add_argument(
        "--first-step",
        action="store_true",
        help="also time the fused CPU kernel's build (empty cache) and load (warm cache) in fresh processes "
        "(CPU only: on CUDA every execution's first step is always recorded)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=10152,
        help="shared source/target dictionary size (default: 10152, the joined IWSLT'14 "
        "De-En dictionary with 10k BPE merges)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--steps-per-round", type=int, default=5, help="steps timed per optimizer per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.device == "cuda" and args.first_step:
        parser.error("--first-step times the fused CPU kernel; on CUDA each execution's first step is always recorded")
    if args.device == "cuda" and args.warmup < 1:
        parser.error("--device cuda needs --warmup >= 1 (the first step, a compile for fused, is reported apart)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    first_step = None
    if args.first_step:
        print(
            "timing the fused kernel's first step in fresh processes (a cold build takes about a minute)",
            file=sys.stderr,
            flush=True,
        )
        first_step = first_step_seconds()
    torch.manual_seed(0)
    shapes = WORKLOADS[args.workload](args)
    n_params = sum(math.prod(s) for s in shapes)
    print(
        f"{args.workload} shapes: {n_params:,} parameters in {len(shapes)} tensors; {torch.get_num_threads()} threads",
        flush=True,
    )
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]
    steps = build_optimizers(shapes, grads, device)
    first_step_ms: dict[str, float] = {}
    for name, step in steps.items():
        for i in range(args.warmup):
            elapsed = ms_per_step(step, 1, device)
            if i == 0:
                first_step_ms[name] = elapsed  # reported on CUDA, where fused's first step compiles it
        if device.type == "cuda":
            print(f"{name}: first step {first_step_ms[name] / 1e3:.2f} s", file=sys.stderr, flush=True)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            times[name].append(ms_per_step(step, args.steps_per_round, device))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    reference = medians["AdamW fused"]
    default_path = default_softadam_path(device)
    print(f"\nSoftAdam's default path on {device.type.upper()}: {default_path}\n")
    print("| optimizer | median ms/step | x fused AdamW |")
    print("|---|---:|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median:.1f} | {median / reference:.2f} |")
    speedup = None
    if "paper per-tensor loop" in medians:
        speedup = medians["paper per-tensor loop"] / medians["SoftAdam (default path)"]
        print(f"\ndefault SoftAdam step: {speedup:.2f}x faster than the paper's per-tensor loop")
    if first_step:
        print(
            f"fused kernel before its first step: {first_step['cold_cache_build']:.1f} s to build into an "
            f"empty cache, {first_step['warm_cache_load']:.2f} s to load from the cache"
        )
    peak_gib = None
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        print(
            "\nfirst step (fused: compiling its kernels): "
            + ", ".join(f"{name} {ms / 1e3:.2f} s" for name, ms in first_step_ms.items())
            + f"\npeak GPU memory allocated: {peak_gib:.1f} GiB"
        )

    if args.json:
        model: dict[str, object] = {"parameters": n_params, "tensors": len(shapes)}
        if args.workload == "transformer":
            model.update(name="transformer_iwslt_de_en", vocab_size=args.vocab_size)
        elif args.workload == "gpt2_1p3b":
            model.update(name="GPT-2 layout, GPT-3 XL sizes, tied embedding", **GPT2_1P3B)
        fields: dict[str, object] = {
            "workload": args.workload,
            "model": model,
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "softadam_default_path": default_path,
            "median_ms_per_step": medians,
            "ratio_to_fused_adamw": {k: v / reference for k, v in medians.items()},
        }
        if device.type == "cuda":
            # Each execution's first step in this process (fused: compiling it, with whatever
            # torch's compile caches on this machine already hold), and the peak allocation.
            fields.update(device="cuda", first_step_seconds={k: v / 1e3 for k, v in first_step_ms.items()})
            fields.update(peak_memory_allocated_gib=peak_gib)
        else:  # the CPU record's fields, unchanged
            fields.update(default_speedup_over_paper_loop=speedup, fused_first_step_seconds=first_step)
        fields["per_round_ms"] = times
        write_bench_record(args.json, "bench_optimizer.py", argv, fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
