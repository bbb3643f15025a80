"""Truncated backpropagation through time inside the Hugging Face Trainer, as the
AWD-LSTM recipe trains (Merity et al. 2017, and its public code's main.py):

- the token stream is cut into `batch_size` contiguous columns; training walks them
  in order, one segment of `seq_len` tokens per step, and the hidden state is carried
  from one segment to the next (detached), reset at the start of every epoch;
- `seq_len` is drawn per segment: `bptt` with probability 0.95 else `bptt / 2`,
  plus normal noise of std 5, at least 5; the learning rate of that step is scaled by
  `seq_len / bptt` (short segments take smaller steps);
- evaluation runs over a whole split with fixed `bptt` segments, carrying the state,
  and reports the per-token cross-entropy and its exponential (perplexity).

One deviation, forced by Trainer: it needs the same number of batches in every epoch,
while the recipe's count varies with the random lengths. Here each epoch draws a fixed
number of lengths (the stream length over the mean segment length) from the recipe's
distribution and stretches them by one common factor (close to 1) so that they cover
the stream exactly; every token is still predicted once per epoch. The draws depend
only on (seed, epoch), so a resumed run sees the same segments.

Single process only: the carried state ties each column to one stream, which
Trainer's data sharding would break; `BPTTTrainer` refuses a distributed run.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback

from softadam_nlp.data.ptb import batchify

LONG_SEGMENT_PROBABILITY = 0.95
LENGTH_NOISE_STD = 5.0
MIN_SEGMENT = 5


def batchify_streams(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`batch_size` contiguous streams, batch-first `(batch, length)`: the demo's
    `batchify` transposed (the `len % batch_size`
    trailing tokens are dropped, as in the recipe)."""
    streams = batchify(tokens, batch_size).t()
    if streams.size(1) < 2:
        raise ValueError(f"{tokens.numel()} tokens are too few for {batch_size} streams")
    return streams


def draw_segment_length(rng: np.random.Generator, bptt: int) -> int:
    """One segment length from the recipe's distribution."""
    base = bptt if rng.random() < LONG_SEGMENT_PROBABILITY else bptt / 2
    return max(MIN_SEGMENT, int(rng.normal(base, LENGTH_NOISE_STD)))


def segment_count(predictions: int, bptt: int) -> int:
    """Segments per epoch: `predictions` (tokens to predict per stream) over the
    recipe's mean segment length."""
    if predictions < 1 or bptt < 1:
        raise ValueError(f"need predictions >= 1 and bptt >= 1, got {predictions} and {bptt}")
    mean_length = LONG_SEGMENT_PROBABILITY * bptt + (1 - LONG_SEGMENT_PROBABILITY) * bptt / 2
    return max(1, min(predictions, round(predictions / mean_length)))


def segments_per_epoch(tokens: torch.Tensor, batch_size: int, bptt: int) -> int:
    """Training steps per epoch for a stream: what a schedule needs before Trainer exists."""
    return segment_count(batchify_streams(tokens, batch_size).size(1) - 1, bptt)


def epoch_segment_lengths(predictions: int, bptt: int, seed: int, epoch: int) -> list[int]:
    """Lengths of one epoch's segments, summing to `predictions` (tokens to predict per
    stream). Their count (`segment_count`) does not depend on the epoch."""
    count = segment_count(predictions, bptt)
    rng = np.random.default_rng([seed, epoch])
    drawn = np.array([draw_segment_length(rng, bptt) for _ in range(count)], dtype=np.float64)
    # Stretch to cover the stream exactly: floor, then hand the remainder to the
    # largest fractional parts; every segment keeps at least one token.
    scaled = drawn * predictions / drawn.sum()
    lengths = np.maximum(np.floor(scaled).astype(np.int64), 1)
    shortfall = predictions - int(lengths.sum())
    order = np.argsort(-(scaled - np.floor(scaled)), kind="stable")
    i = 0
    while shortfall != 0:
        j = order[i % count]
        if shortfall > 0:
            lengths[j] += 1
            shortfall -= 1
        elif lengths[j] > 1:
            lengths[j] -= 1
            shortfall += 1
        i += 1
    return lengths.tolist()


class BPTTSegments(Dataset):
    """One epoch of training segments; item `i` is already a batch:
    `{"input_ids", "labels"}` of shape `(batch, seq_len)` plus `seq_len` and `segment` (= i).
    Call `set_epoch` before iterating an epoch."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, bptt: int, seed: int = 0):
        self.streams = batchify_streams(tokens, batch_size)
        self.bptt, self.seed = bptt, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.lengths = epoch_segment_lengths(self.streams.size(1) - 1, self.bptt, self.seed, epoch)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        start, length = self.starts[i], self.lengths[i]
        return {
            "input_ids": self.streams[:, start : start + length],
            "labels": self.streams[:, start + 1 : start + 1 + length],
            "seq_len": length,
            "segment": i,
        }


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, bptt: int) -> dict[str, float]:
    """Mean per-token cross-entropy over a whole split (fixed `bptt` segments, state
    carried, as the recipe evaluates): `{"loss", "ppl", "tokens"}`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    streams = batchify_streams(tokens, batch_size).to(device)
    hidden, total, count = None, 0.0, 0
    for start in range(0, streams.size(1) - 1, bptt):
        length = min(bptt, streams.size(1) - 1 - start)
        out = model(
            input_ids=streams[:, start : start + length],
            labels=streams[:, start + 1 : start + 1 + length],
            hidden=hidden,
        )
        hidden = out.hidden
        total += out.cross_entropy.item() * length * batch_size
        count += length * batch_size
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


class _EpochAndLearningRate(TrainerCallback):
    """Tells the segments which epoch starts; scales each step's learning rate by
    `seq_len / bptt` and restores it after the step (so schedules never see it)."""

    def __init__(self, trainer: BPTTTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional on a mid-epoch resume (2.37 -> epoch 2) and may land
        # a hair under an integer at an epoch boundary.
        self.trainer.train_segments.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))
        self.trainer.carried_hidden = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        lengths = self.trainer.pending_lengths
        factor = (sum(lengths) / len(lengths)) / self.trainer.bptt if lengths else 1.0
        self.trainer.pending_lengths = []
        self.saved_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for group, lr in zip(optimizer.param_groups, self.saved_lrs):
            group["lr"] = lr


class BPTTTrainer(Trainer):
    """Trainer for a recurrent LM whose forward takes and returns `hidden`
    (e.g. `AWDLSTMForLanguageModeling`).

    `train_tokens` / `eval_tokens` are 1-D token-id streams; the training batch is
    `args.per_device_train_batch_size` streams, evaluation uses
    `args.per_device_eval_batch_size`. `evaluate` reports `<prefix>_loss` and
    `<prefix>_ppl` over the whole split.
    """

    def __init__(
        self,
        *args: Any,
        train_tokens: torch.Tensor,
        eval_tokens: Optional[torch.Tensor] = None,
        bptt: int = 70,
        **kwargs: Any,
    ):
        if bptt < 2:
            raise ValueError(f"bptt must be >= 2, got {bptt}")
        self.bptt = bptt
        self.eval_tokens = eval_tokens
        self.carried_hidden = None
        self.pending_lengths: list[int] = []
        self._clock_started: Optional[float] = None
        self._clock_offset: Optional[float] = None
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.train_segments = BPTTSegments(
            train_tokens, training_args.per_device_train_batch_size, bptt, seed=training_args.seed
        )
        # eval_dataset is only there for Trainer's checks: evaluate() reads eval_tokens.
        super().__init__(*args, train_dataset=self.train_segments, eval_dataset=eval_tokens, **kwargs)
        if self.args.world_size > 1:
            raise RuntimeError("BPTTTrainer trains in one process: carried hidden states cannot be sharded")
        self.add_callback(_EpochAndLearningRate(self))

    def train(self, *args: Any, **kwargs: Any):
        self._clock_started, self._clock_offset = time.time(), None
        return super().train(*args, **kwargs)

    def train_seconds(self) -> Optional[float]:
        """Wall seconds of training so far, evaluations included, summed over resumed
        sessions (each session adds on to what the checkpoint's log history last said)."""
        if self._clock_started is None:
            return None
        if self._clock_offset is None:
            logged = [e[k] for e in self.state.log_history for k in e if k.endswith("_train_seconds")]
            self._clock_offset = logged[-1] if logged else 0.0
        return self._clock_offset + time.time() - self._clock_started

    def get_train_dataloader(self) -> DataLoader:
        # Each item is a whole batch, in order: no sampler, no collation, no shuffling.
        return DataLoader(self.train_segments, batch_size=None, shuffle=False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs["segment"] == 0:
            self.carried_hidden = None
        self.pending_lengths.append(int(inputs["seq_len"]))
        outputs = model(input_ids=inputs["input_ids"], labels=inputs["labels"], hidden=self.carried_hidden)
        self.carried_hidden = outputs.hidden
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def evaluate(
        self, eval_dataset: Optional[torch.Tensor] = None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        tokens = self.eval_tokens if eval_dataset is None else eval_dataset
        if tokens is None:
            raise ValueError("no evaluation tokens: pass eval_tokens= to BPTTTrainer or a stream to evaluate()")
        started = time.time()
        result = evaluate_stream(self.model, tokens, self.args.per_device_eval_batch_size, self.bptt)
        metrics = {
            f"{metric_key_prefix}_loss": result["loss"],
            f"{metric_key_prefix}_ppl": result["ppl"],
            f"{metric_key_prefix}_runtime": time.time() - started,
        }
        if self._clock_started is not None:
            metrics[f"{metric_key_prefix}_train_seconds"] = self.train_seconds()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
