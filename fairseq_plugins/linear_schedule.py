"""`--lr-scheduler linear`: the linear warmup and decay of Liu et al. (2019)'s IWSLT'14 recipe.

The SoftAdam paper trains Table 3 "following Liu et al. (2019)" with "a linear learning
rate schedule". That recipe (the RAdam repository, nmt/recipes.md) warms the rate up
linearly from `--warmup-init-lr` to `--lr` over `--warmup-updates`, then decays it
linearly to `--min-lr` at `--max-update`. fairseq's `polynomial_decay` comes close but
starts its warmup at `lr / warmup_updates`, not at a given rate. For update count n
(W warmup updates, N = `--max-update`):

    n < W:   lr(n) = warmup_init_lr + n * (lr - warmup_init_lr) / W
    n >= W:  lr(n) = min_lr + (lr - min_lr) * (1 - (n - W) / (N - W))

`--warmup-init-lr` defaults to `--lr` (no ramp), so `--warmup-updates 1` or 0 is the
recipe's warmup-free setting: the first update runs at `--lr`. Like every fairseq
scheduler, the rate set after update n is the one update n + 1 uses.
"""

# No `from __future__ import annotations`: fairseq reads the config's field types at run time.
from dataclasses import dataclass, field
from typing import List, Optional  # noqa: UP035  (fairseq's parser understands typing's spellings)

from fairseq.dataclass import FairseqDataclass
from fairseq.optim.lr_scheduler import FairseqLRScheduler, register_lr_scheduler
from omegaconf import II


@dataclass
class LinearScheduleConfig(FairseqDataclass):
    warmup_updates: int = field(default=0, metadata={"help": "warm the learning rate up over the first N updates"})
    warmup_init_lr: float = field(
        default=-1.0, metadata={"help": "learning rate at the start of the warmup; default (-1): --lr"}
    )
    min_lr: float = field(default=0.0, metadata={"help": "learning rate reached at --max-update"})
    lr: List[float] = II("optimization.lr")  # noqa: UP006
    max_update: int = II("optimization.max_update")


@register_lr_scheduler("linear", dataclass=LinearScheduleConfig)
class LinearSchedule(FairseqLRScheduler):
    """Linear warmup from `--warmup-init-lr`, then linear decay to `--min-lr` at `--max-update`."""

    def __init__(self, cfg: LinearScheduleConfig, optimizer) -> None:
        super().__init__(cfg, optimizer)
        if len(cfg.lr) > 1:
            raise ValueError("--lr-scheduler linear takes one --lr (a list of rates is for --lr-scheduler fixed)")
        if cfg.warmup_updates < 0 or cfg.max_update <= cfg.warmup_updates:
            raise ValueError(
                f"--lr-scheduler linear needs 0 <= --warmup-updates < --max-update, got "
                f"{cfg.warmup_updates} and {cfg.max_update}"
            )
        self.peak = cfg.lr[0]
        self.start = self.peak if cfg.warmup_init_lr < 0 else cfg.warmup_init_lr
        self.optimizer.set_lr(self.lr_at(0))

    def lr_at(self, num_updates: int) -> float:
        """The learning rate after `num_updates` updates (the one the next update uses)."""
        warmup, total, floor = self.cfg.warmup_updates, self.cfg.max_update, self.cfg.min_lr
        if num_updates < warmup:
            return self.start + num_updates * (self.peak - self.start) / warmup
        progress = min(num_updates - warmup, total - warmup) / (total - warmup)
        return floor + (self.peak - floor) * (1.0 - progress)

    def step(self, epoch: int, val_loss: Optional[float] = None) -> float:
        super().step(epoch, val_loss)
        return self.optimizer.get_lr()  # the rate moves per update, not per epoch

    def step_update(self, num_updates: int) -> float:
        lr = self.lr_at(num_updates)
        self.optimizer.set_lr(lr)
        return lr
