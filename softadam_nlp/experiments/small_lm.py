"""A small LSTM language model on PTB: a quick, real-data comparison of optimizers.

This is the demo's workload until the full AWD-LSTM experiment lands: one tied
LSTM layer, truncated BPTT over contiguous streams with the hidden state carried
between segments, gradient clipping, and periodic validation perplexity.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from softadam_nlp.data.ptb import PTBCorpus, batchify
from softadam_nlp.softadam import SoftAdam


@dataclass(frozen=True)
class SmallLMConfig:
    hidden_size: int = 256
    batch_size: int = 20
    bptt: int = 35
    steps: int = 600
    eval_every: int = 100
    eval_tokens: int = 20_000  # validation prefix used for the curve; the final number uses all of it
    clip: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name with its learning rate and extra keyword arguments."""

    name: str
    lr: float
    kwargs: tuple[tuple[str, object], ...] = ()

    def build(self, params) -> torch.optim.Optimizer:
        kwargs = dict(self.kwargs)
        if self.name == "softadam":
            return SoftAdam(params, lr=self.lr, **kwargs)
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, **kwargs)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, **kwargs)
        raise ValueError(f"unknown optimizer {self.name!r}: choose softadam, sgd or adam")

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.name}(lr={self.lr:g}{', ' + extra if extra else ''})"


class TiedLSTMLM(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        self.decoder.weight = self.embed.weight  # tied input/output embeddings
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, state=None):
        output, state = self.lstm(self.embed(tokens), state)
        return self.decoder(output), state


def _detach(state):
    return tuple(s.detach() for s in state)


@torch.no_grad()
def evaluate(model: TiedLSTMLM, stream: torch.Tensor, bptt: int) -> float:
    """Perplexity over a (length, batch) stream, hidden state carried across segments."""
    model.eval()
    total, count, state = 0.0, 0, None
    for i in range(0, stream.size(0) - 1, bptt):
        seq_len = min(bptt, stream.size(0) - 1 - i)
        inputs, targets = stream[i : i + seq_len], stream[i + 1 : i + 1 + seq_len]
        logits, state = model(inputs, state)
        total += nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train()
    return math.exp(total / count)


def train_small_lm(
    corpus: PTBCorpus,
    spec: OptimizerSpec,
    config: SmallLMConfig = SmallLMConfig(),
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Train one model with one optimizer; return a JSON-ready record with its curve."""
    torch.manual_seed(config.seed)
    model = TiedLSTMLM(corpus.vocab_size, config.hidden_size)
    optimizer = spec.build(model.parameters())
    train = batchify(corpus.splits["train"], config.batch_size)
    valid_curve = batchify(corpus.splits["valid"][: config.eval_tokens], 10)
    valid_full = batchify(corpus.splits["valid"], 10)

    curve, state, position, window = [], None, 0, []
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        if position + config.bptt + 1 > train.size(0):
            position, state = 0, None  # next epoch: start the streams over
        inputs = train[position : position + config.bptt]
        targets = train[position + 1 : position + 1 + config.bptt]
        position += config.bptt
        state = _detach(state) if state is not None else None
        logits, state = model(inputs, state)
        loss = nn.functional.cross_entropy(logits.view(-1, corpus.vocab_size), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{spec.describe()}: training loss became {loss.item()} at step {step}")
        window.append(loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            train_ppl = math.exp(sum(window) / len(window))
            valid_ppl = evaluate(model, valid_curve, config.bptt)
            curve.append({"step": step, "train_ppl": train_ppl, "valid_ppl_prefix": valid_ppl})
            window = []
            if progress:
                progress(f"{spec.describe()}: step {step}/{config.steps}  train ppl {train_ppl:8.2f}  "
                         f"valid ppl (first {config.eval_tokens:,} tokens) {valid_ppl:8.2f}  "
                         f"[{time.perf_counter() - start:5.0f}s]")
    valid_ppl = evaluate(model, valid_full, config.bptt)
    return {
        "optimizer": spec.name,
        "spec": spec.describe(),
        "lr": spec.lr,
        "optimizer_kwargs": dict(spec.kwargs),
        "config": asdict(config),
        "curve": curve,
        "valid_ppl": valid_ppl,
        "train_seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
