r"""Schedules on SoftAdam's eta: Adam-like early and SGD-like late, or the other way.

The paper's conclusion: "SoftAdam now also makes it possible to create a learning
schedule on eta". `EtaScheduler` sets `eta` of every parameter group per
optimizer step, with the interface of `torch.optim.lr_scheduler.LRScheduler`
(`step`, `state_dict`, `load_state_dict`, `last_epoch`), so it runs beside an
lr scheduler and resumes from a checkpoint. `WithEtaSchedule` steps an lr
schedule and an eta schedule as one scheduler object, for trainers that take one
(transformers' Trainer).

Schedules, for step $t$ (optimizer steps taken so far) of `total_steps`, with
$p = \min(t, T)/T$:

- `constant`: $\eta_0$;
- `linear`: $\eta_0 + (\eta_1 - \eta_0)\,p$;
- `cosine`: $\eta_1 + (\eta_0 - \eta_1)(1 + \cos \pi p)/2$;
- `steps`: `etas[i]` from step `milestones[i]` on ($\eta_0$ before the first).

$\eta_0$ is each group's eta when the scheduler is created, $\eta_1$ is
`eta_end`. The step-t eta is a function of t alone (`eta_at`), so a trainer
that knows its update count (fairseq) needs no scheduler state at all.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Optional, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["ETA_SCHEDULES", "TOOLKIT_ETA_SCHEDULES", "EtaScheduler", "WithEtaSchedule", "eta_at"]

ETA_SCHEDULES = ("constant", "linear", "cosine", "steps")
# The schedules the toolkit adapters and experiment scripts offer (a start, an end, a length).
TOOLKIT_ETA_SCHEDULES = ("constant", "linear", "cosine")


def eta_at(
    step: int,
    schedule: str,
    eta_start: float,
    eta_end: Optional[float] = None,
    total_steps: Optional[int] = None,
    milestones: Sequence[int] = (),
    etas: Sequence[float] = (),
) -> float:
    """Eta after `step` optimizer steps (the value the next step uses)."""
    if schedule == "constant":
        return eta_start
    if schedule == "steps":
        passed = bisect.bisect_right(list(milestones), step)
        return eta_start if passed == 0 else float(etas[passed - 1])
    progress = min(step, total_steps) / total_steps  # type: ignore[type-var,operator]
    if schedule == "linear":
        return eta_start + (eta_end - eta_start) * progress  # type: ignore[operator]
    if schedule == "cosine":
        return eta_end + (eta_start - eta_end) * (1 + math.cos(math.pi * progress)) / 2  # type: ignore[operator]
    raise ValueError(f"unknown eta schedule {schedule!r}; choose one of {', '.join(ETA_SCHEDULES)}")


def check_eta_schedule(
    schedule: str,
    eta_end: Optional[float] = None,
    total_steps: Optional[int] = None,
    milestones: Sequence[int] = (),
    etas: Sequence[float] = (),
) -> None:
    """ValueError for a schedule that cannot run, naming what is wrong."""
    if schedule not in ETA_SCHEDULES:
        raise ValueError(f"unknown eta schedule {schedule!r}; choose one of {', '.join(ETA_SCHEDULES)}")
    if schedule in ("linear", "cosine"):
        if eta_end is None or not eta_end >= 0:
            raise ValueError(f"the {schedule} eta schedule needs eta_end >= 0, got {eta_end!r}")
        if total_steps is None or total_steps <= 0:
            raise ValueError(f"the {schedule} eta schedule needs total_steps > 0, got {total_steps!r}")
    if schedule == "steps":
        if len(milestones) == 0 or len(milestones) != len(etas):
            raise ValueError("the steps eta schedule needs milestones and etas of the same, non-zero length")
        if list(milestones) != sorted(milestones) or any(m <= 0 for m in milestones):
            raise ValueError(f"milestones must be increasing positive step counts, got {list(milestones)}")
        if any(not e >= 0 for e in etas):
            raise ValueError(f"every eta must be >= 0, got {list(etas)}")


def eta_schedule_cli_error(optimizer: str, schedule: str, eta_end: Optional[float]) -> Optional[str]:
    """What is wrong with `--eta-schedule`/`--eta-end` on an experiment script's command
    line, or None."""
    if schedule != "constant" and (optimizer != "softadam" or eta_end is None or eta_end < 0):
        return "--eta-schedule is SoftAdam's and needs --eta-end >= 0"
    if schedule == "constant" and eta_end is not None:
        return "--eta-end needs a linear or cosine --eta-schedule"
    return None


class EtaScheduler:
    """Sets `eta` of each parameter group of a SoftAdam optimizer by step.

    Call `step` after each `optimizer.step()`, like an lr scheduler. Each
    group starts from its own eta (kept as `initial_eta` in the group, as torch keeps
    `initial_lr`); `eta_end` may be one value or one per group.

    Args:
        optimizer: a `SoftAdam` (any optimizer whose groups have `eta`).
        schedule: `"constant"`, `"linear"`, `"cosine"` or `"steps"`.
        eta_end: the eta reached at `total_steps` (linear, cosine).
        total_steps: optimizer steps over which eta moves (linear, cosine).
        milestones: step counts at which eta changes (steps).
        etas: the eta used from each milestone on (steps).
        last_epoch: the index of the last step taken, -1 for a fresh start (torch's name).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: str = "linear",
        eta_end: Optional[float | Sequence[float]] = None,
        total_steps: Optional[int] = None,
        milestones: Sequence[int] = (),
        etas: Sequence[float] = (),
        last_epoch: int = -1,
    ) -> None:
        if not all("eta" in group for group in optimizer.param_groups):
            raise TypeError(
                f"{type(optimizer).__name__} has no eta in its parameter groups: EtaScheduler is for SoftAdam"
            )
        ends = list(eta_end) if isinstance(eta_end, (list, tuple)) else [eta_end] * len(optimizer.param_groups)
        if len(ends) != len(optimizer.param_groups):
            raise ValueError(f"eta_end has {len(ends)} values for {len(optimizer.param_groups)} parameter groups")
        for end in ends:
            check_eta_schedule(schedule, end, total_steps, milestones, etas)
        self.optimizer = optimizer
        self.schedule = schedule
        self.eta_ends = ends
        self.total_steps = total_steps
        self.milestones = list(milestones)
        self.etas = [float(e) for e in etas]
        for group in optimizer.param_groups:
            if last_epoch == -1:
                group.setdefault("initial_eta", group["eta"])
            elif "initial_eta" not in group:
                raise KeyError("param 'initial_eta' is not specified in param_groups when resuming an EtaScheduler")
        self.last_epoch = last_epoch
        self.step()  # as torch's schedulers do: set the eta of the first step

    def eta_for_group(self, index: int, step: int) -> float:
        group = self.optimizer.param_groups[index]
        return eta_at(
            step,
            self.schedule,
            group["initial_eta"],
            self.eta_ends[index],
            self.total_steps,
            self.milestones,
            self.etas,
        )

    def step(self) -> None:
        """Advance one optimizer step and set the etas the next step uses."""
        self.last_epoch += 1
        for index, group in enumerate(self.optimizer.param_groups):
            group["eta"] = self.eta_for_group(index, self.last_epoch)

    def get_last_eta(self) -> list[float]:
        """The eta of each group as last set."""
        return [group["eta"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        for index, group in enumerate(self.optimizer.param_groups):
            group["eta"] = self.eta_for_group(index, self.last_epoch)


class WithEtaSchedule(LRScheduler):
    """An lr scheduler and an `EtaScheduler` stepped, saved and restored as one.

    For trainers that accept one scheduler object and call its `step` after every
    optimizer step (transformers' Trainer); `get_last_lr` and everything else an lr
    scheduler answers come from the lr scheduler.
    """

    def __init__(self, lr_scheduler: LRScheduler, eta_scheduler: EtaScheduler) -> None:
        # Not LRScheduler.__init__: that would take over the optimizer's lr; this only delegates.
        self.lr_scheduler = lr_scheduler
        self.eta_scheduler = eta_scheduler
        self.optimizer = lr_scheduler.optimizer

    def __getattr__(self, name: str) -> Any:
        # Anything else (base_lrs, _step_count, ...) is the lr scheduler's. The two
        # names below are looked up before they exist while unpickling a copy.
        if name in ("lr_scheduler", "eta_scheduler"):
            raise AttributeError(name)
        return getattr(self.lr_scheduler, name)

    def step(self, epoch: Optional[int] = None) -> None:  # type: ignore[override]
        self.lr_scheduler.step()
        self.eta_scheduler.step()

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        return self.lr_scheduler.get_last_lr()

    def get_last_eta(self) -> list[float]:
        return self.eta_scheduler.get_last_eta()

    @property
    def last_epoch(self) -> int:  # type: ignore[override]
        return self.lr_scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr_scheduler.state_dict(), "eta": self.eta_scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lr_scheduler.load_state_dict(state_dict["lr"])
        self.eta_scheduler.load_state_dict(state_dict["eta"])
