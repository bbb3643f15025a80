"""SoftAdam for the Hugging Face Trainer.

    trainer = Trainer(model=model, args=training_args,
                      optimizers=create_optimizer_and_scheduler(model, training_args))

or, letting Trainer build the parameter groups and the schedule itself,

    trainer = Trainer(model=model, args=training_args,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(training_args, eta=1.0))

Schedules come from transformers' own `get_scheduler` (every `SchedulerType`
name: linear, cosine, constant, polynomial, inverse_sqrt, reduce_lr_on_plateau, ...),
plus `"step"`, the paper's schedule (x0.1 at 50% and 75% of training). Warmup is read
from `args.warmup_steps` (steps if >= 1, a ratio of training if < 1); its default, 0,
is how the paper trains SoftAdam.

When `args` do not fix the number of training steps (the default: `num_train_epochs`
sets it, through the data loader), a schedule that needs it is built at the first
optimizer step, with the length of the Trainer that holds it
(`ScheduleAtFirstStep`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import Trainer, TrainingArguments
from transformers.optimization import get_scheduler
from transformers.trainer_utils import SchedulerType

from softadam_nlp.eta_schedule import (
    TOOLKIT_ETA_SCHEDULES as HF_ETA_SCHEDULES,
)
from softadam_nlp.eta_schedule import (
    EtaScheduler,
    WithEtaSchedule,
    check_eta_schedule,
)
from softadam_nlp.softadam import SoftAdam

__all__ = [
    "OPTIMIZER_NAMES",
    "ScheduleAtFirstStep",
    "build_optimizers",
    "create_optimizer",
    "create_optimizer_and_scheduler",
    "create_scheduler",
    "get_step_schedule_with_warmup",
    "optimizer_cls_and_kwargs",
    "SCHEDULE_NAMES",
    "add_deepspeed_argument",
    "normalize_trainer_spellings",
    "add_optimizer_arguments",
    "deepspeed_cli_error",
    "available_reporters",
    "optimizers_from_cli",
    "trainer_optimizer_arguments",
    "trainer_schedule_name",
]

STEP_SCHEDULE = "step"
SCHEDULE_NAMES = tuple(t.value for t in SchedulerType) + (STEP_SCHEDULE,)
# Schedules that Trainer steps on an evaluation metric (in Trainer.evaluate), not after
# every optimizer step. Names as strings: "greedy" is new in transformers 5.
METRIC_DRIVEN_SCHEDULES = ("reduce_lr_on_plateau", "greedy")
# Schedules that can be built without knowing the number of training steps (a warmup
# given as a ratio of training aside).
_NO_LENGTH_NEEDED = {"constant", "constant_with_warmup", "inverse_sqrt", *METRIC_DRIVEN_SCHEDULES}
_WITH_WARMUP = {"constant_with_warmup", "inverse_sqrt"}


def softadam_kwargs_from_args(args: TrainingArguments, **overrides: Any) -> dict[str, Any]:
    """SoftAdam's keyword arguments (without parameter groups or weight decay).

    `betas` and `eps` follow `args.adam_beta1/adam_beta2/adam_epsilon` (whose
    defaults equal SoftAdam's); `overrides` (eta, betas, eps, nesterov, ...) win.
    """
    kwargs: dict[str, Any] = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    kwargs.update(overrides)
    unknown = set(kwargs) - {"lr", "betas", "eps", "eta", "nesterov", "maximize", "foreach", "fused", "nonfinite"}
    if unknown:
        raise TypeError(
            f"unexpected SoftAdam argument(s) {sorted(unknown)}; weight decay comes from "
            "args.weight_decay and the learning rate from args.learning_rate"
        )
    return kwargs


def optimizer_cls_and_kwargs(args: TrainingArguments, **softadam_kwargs: Any) -> tuple[type, dict[str, Any]]:
    """For `Trainer(optimizer_cls_and_kwargs=...)`: Trainer makes the decay/no-decay
    groups with `args.weight_decay` and builds the schedule from `args`. This is the
    route that works under DeepSpeed (ZeRO stages 0-2), where Trainer hands the optimizer
    it builds to DeepSpeed."""
    return SoftAdam, softadam_kwargs_from_args(args, **softadam_kwargs)


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups exactly as `Trainer.create_optimizer` makes them.

    Trainer decides which parameters get weight decay with its own
    `get_decay_parameter_names` (no biases, no normalization weights); it reads
    nothing from the Trainer instance, so it is called unbound here to reuse that
    rule rather than copy it.
    """
    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # param_names (a torch.optim group key): SoftAdam names a parameter whose gradient
    # is not finite by it.
    return [
        {
            "params": [p for n, p in named if n in decay],
            "param_names": [n for n, _ in named if n in decay],
            "weight_decay": weight_decay,
        },
        {
            "params": [p for n, p in named if n not in decay],
            "param_names": [n for n, _ in named if n not in decay],
            "weight_decay": 0.0,
        },
    ]


def _refuse_under_deepspeed(args: TrainingArguments) -> None:
    """Trainer(optimizers=...) under DeepSpeed: Trainer would silently train its own optimizer."""
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "TrainingArguments.deepspeed is set: under DeepSpeed, Trainer discards an optimizer given as "
            "Trainer(optimizers=...) and silently trains the one it builds itself. Pass SoftAdam as "
            "Trainer(optimizer_cls_and_kwargs=softadam_nlp.hf.optimizer_cls_and_kwargs(args, eta=...)) instead, "
            'with ZeRO stage 0, 1 or 2 (SoftAdam refuses stage 3), and no "optimizer" section in the DeepSpeed '
            "config; Trainer then builds the learning-rate schedule from args (eta schedules need optimizers=, "
            "so they are not available under DeepSpeed)."
        )


def create_optimizer(model: torch.nn.Module, args: TrainingArguments, **softadam_kwargs: Any) -> SoftAdam:
    """SoftAdam over `model` with Trainer's weight-decay grouping and `args`' settings.

    Raises ValueError when `args.deepspeed` is set: use `optimizer_cls_and_kwargs` there.
    """
    _refuse_under_deepspeed(args)
    return SoftAdam(
        decay_parameter_groups(model, args.weight_decay), **softadam_kwargs_from_args(args, **softadam_kwargs)
    )


def _step_lambda(step: int, *, num_warmup_steps: int, milestones: Sequence[int], gamma: float) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return gamma ** sum(step >= m for m in milestones)


def get_step_schedule_with_warmup(
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    last_epoch: int = -1,
) -> LambdaLR:
    """The paper's step schedule: the learning rate times `gamma` at each milestone
    (fractions of `num_training_steps`), after an optional linear warmup.

    transformers has no step schedule; this follows the shape of its
    `get_*_schedule_with_warmup` functions (a LambdaLR over a picklable partial).
    """
    if not all(0 < m < 1 for m in milestones):
        raise ValueError(f"milestones must be fractions of training in (0, 1), got {list(milestones)}")
    steps = sorted(int(round(m * num_training_steps)) for m in milestones)
    lr_lambda = partial(_step_lambda, num_warmup_steps=num_warmup_steps, milestones=steps, gamma=gamma)
    return LambdaLR(optimizer, lr_lambda, last_epoch)


def _resolve_training_steps(args: TrainingArguments, num_training_steps: Optional[int]) -> Optional[int]:
    if num_training_steps is not None:
        if num_training_steps < 1:
            raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
        return num_training_steps
    if args.max_steps is not None and args.max_steps > 0:
        return args.max_steps
    return None


def _needs_length(name: str, args: TrainingArguments) -> bool:
    return name not in _NO_LENGTH_NEEDED or (name in _WITH_WARMUP and 0 < args.warmup_steps < 1)


_LENGTH_UNKNOWN = (
    "the training length is not known: args do not fix it (max_steps is not set) and no Trainer holds this "
    "schedule. Pass num_training_steps=ceil(len(train_dataloader) / gradient_accumulation_steps) * "
    "num_train_epochs, or set max_steps in TrainingArguments, or hand the schedule to Trainer(optimizers=...), "
    "which knows the length once it has the data loader."
)


def _trainer_training_length(schedule: Any) -> int:
    """`state.max_steps` of the Trainer whose `lr_scheduler` is `schedule`.

    Trainer fixes the number of optimizer steps when training starts and hands it to
    nothing it was given; this finds it the one time it is needed, at the first optimizer
    step, among the live Trainer objects (`Trainer.lr_scheduler` and
    `Trainer.state.max_steps` are public attributes)."""
    for obj in gc.get_objects():
        # type(), not isinstance(): some objects warn when their __class__ is read
        if issubclass(type(obj), Trainer) and obj.lr_scheduler is schedule and obj.state.max_steps > 0:
            return int(obj.state.max_steps)
    raise ValueError(_LENGTH_UNKNOWN)


class ScheduleAtFirstStep(LRScheduler):
    """A learning-rate (and eta) schedule built at the first optimizer step, when the
    number of training steps is known.

    `create_scheduler` and `create_optimizer_and_scheduler` return one when `args`
    leave the length to the data loader (`num_train_epochs`, the default), so that
    `Trainer(optimizers=create_optimizer_and_scheduler(model, args))` runs unchanged:
    at the first `optimizer.step()` (a step pre-hook), `build(num_training_steps)`
    makes the schedule, with the length of the Trainer that holds this object. Until then
    the learning rate is `args.learning_rate`; every step the schedule takes is the
    built schedule's. Its `state_dict` keeps the length, so a resumed run rebuilds the
    same schedule before its first step. Outside Trainer, the first step raises a
    ValueError saying how to give the length.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, build: Callable[[int], LRScheduler]) -> None:
        # Not LRScheduler.__init__: the built schedule owns the learning rate.
        self.optimizer = optimizer
        self.build = build
        self.schedule: Optional[LRScheduler] = None
        self.num_training_steps: Optional[int] = None
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    def __getattr__(self, name: str) -> Any:
        # base_lrs, lr_lambdas, get_last_eta, ...: the built schedule's. The names below are
        # looked up before they exist while unpickling a copy.
        if name in ("schedule", "build", "optimizer", "num_training_steps", "_hook") or self.schedule is None:
            raise AttributeError(name)
        return getattr(self.schedule, name)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.schedule is None:
            self._build(_trainer_training_length(self))
            # torch's schedulers count the optimizer's steps through a wrapper that the one just
            # built installed during this step; tell it this step happened (no false warning
            # that the schedule stepped first).
            self.optimizer._opt_called = True  # type: ignore[attr-defined]

    def _build(self, num_training_steps: int) -> None:
        self.schedule = self.build(num_training_steps)
        self.num_training_steps = num_training_steps
        self._hook.remove()

    def step(self, epoch: Optional[int] = None) -> None:  # type: ignore[override]
        if self.schedule is None:
            self._build(_trainer_training_length(self))
        self.schedule.step()  # type: ignore[union-attr]

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        if self.schedule is None:
            return [group["lr"] for group in self.optimizer.param_groups]
        return self.schedule.get_last_lr()

    @property
    def last_epoch(self) -> int:  # type: ignore[override]
        return -1 if self.schedule is None else self.schedule.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_training_steps": self.num_training_steps,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["num_training_steps"] is None:
            return  # saved before the first step: nothing was built yet
        if self.schedule is None:
            # Building sets the lr (and eta) of a first step; the optimizer's loaded state
            # holds the resumed step's, as torch's schedulers leave them on resumption.
            groups = self.optimizer.param_groups
            resumed = [{k: group[k] for k in ("lr", "eta") if k in group} for group in groups]
            self._build(state_dict["num_training_steps"])
            self.schedule.load_state_dict(state_dict["schedule"])  # type: ignore[union-attr]
            for group, values in zip(groups, resumed):
                group.update(values)
        elif state_dict["num_training_steps"] != self.num_training_steps:
            raise ValueError(
                f"the saved schedule is {state_dict['num_training_steps']} steps long, this one "
                f"{self.num_training_steps}"
            )
        else:
            self.schedule.load_state_dict(state_dict["schedule"])


def _schedule(
    optimizer: torch.optim.Optimizer, args: TrainingArguments, name: str, total: Optional[int]
) -> LRScheduler:
    """The `name` schedule over `total` steps (None: a schedule that needs no length)."""
    warmup = args.get_warmup_steps(total or 0)
    if name == STEP_SCHEDULE:
        return get_step_schedule_with_warmup(optimizer, warmup, total, **(args.lr_scheduler_kwargs or {}))
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )


def _schedule_name(args: TrainingArguments, lr_scheduler_type: Optional[str]) -> str:
    name = lr_scheduler_type or getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown lr_scheduler_type {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return name


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    args: TrainingArguments,
    num_training_steps: Optional[int] = None,
    lr_scheduler_type: Optional[str] = None,
) -> LRScheduler:
    """The learning-rate schedule `args` asks for (or `lr_scheduler_type`).

    The number of optimizer steps comes from `num_training_steps`, else
    `args.max_steps`, else (training length set by epochs) from the Trainer that the
    schedule is given to: a `ScheduleAtFirstStep` then builds it at the first
    optimizer step. Schedules that need no length (constant, reduce_lr_on_plateau,
    greedy, ...) are built at once.
    """
    name = _schedule_name(args, lr_scheduler_type)
    total = _resolve_training_steps(args, num_training_steps)
    if total is None and _needs_length(name, args):
        return ScheduleAtFirstStep(optimizer, partial(_schedule, optimizer, args, name))
    return _schedule(optimizer, args, name, total)


def _with_eta_schedule(
    optimizer: SoftAdam, args: TrainingArguments, name: str, eta_schedule: str, eta_end: Optional[float], total: int
) -> LRScheduler:
    return WithEtaSchedule(
        _schedule(optimizer, args, name, total),
        EtaScheduler(optimizer, eta_schedule, eta_end=eta_end, total_steps=total),
    )


def create_optimizer_and_scheduler(
    model: torch.nn.Module,
    args: TrainingArguments,
    num_training_steps: Optional[int] = None,
    lr_scheduler_type: Optional[str] = None,
    eta_schedule: str = "constant",
    eta_end: Optional[float] = None,
    **softadam_kwargs: Any,
) -> tuple[SoftAdam, LRScheduler]:
    """`(SoftAdam, schedule)` for `Trainer(optimizers=...)`.

    Reads learning_rate, weight_decay (not applied to biases and normalization weights,
    as Trainer does), adam_beta1/2 and adam_epsilon, lr_scheduler_type (or the
    `lr_scheduler_type` argument, which also accepts `"step"`), warmup_steps
    (default 0: no warmup) and max_steps. `softadam_kwargs` (eta, betas, eps,
    nesterov, nonfinite, fused, foreach) override. The training length is
    `num_training_steps`, else `args.max_steps`, else the Trainer's, taken at the
    first optimizer step (`ScheduleAtFirstStep`).

    `eta_schedule` ("constant", "linear" or "cosine") moves eta from its value to
    `eta_end` over the training steps (softadam_nlp.eta_schedule). The schedule
    returned then steps, saves and restores the lr and the eta schedule together, so
    Trainer's checkpoints resume both. Eta schedules advance with every optimizer step,
    so they cannot go with the schedules Trainer steps on evaluation metrics
    (reduce_lr_on_plateau, greedy): that combination is a ValueError.
    """
    if eta_schedule not in HF_ETA_SCHEDULES:
        raise ValueError(f"unknown eta_schedule {eta_schedule!r}; choose one of {', '.join(HF_ETA_SCHEDULES)}")
    name = _schedule_name(args, lr_scheduler_type)
    if eta_schedule == "constant":
        if eta_end is not None:
            raise ValueError("eta_end needs a linear or cosine eta_schedule")
        optimizer = create_optimizer(model, args, **softadam_kwargs)
        return optimizer, create_scheduler(optimizer, args, num_training_steps, name)
    if name in METRIC_DRIVEN_SCHEDULES:
        raise ValueError(
            f"eta_schedule={eta_schedule!r} cannot go with lr_scheduler_type={name!r}: Trainer steps {name} only "
            "when it evaluates (on a metric), while an eta schedule advances with every optimizer step. Use a "
            "constant eta with it, or an lr schedule that steps every optimizer step (linear, cosine, step, ...)."
        )
    optimizer = create_optimizer(model, args, **softadam_kwargs)
    build = partial(_with_eta_schedule, optimizer, args, name, eta_schedule, eta_end)
    total = _resolve_training_steps(args, num_training_steps)
    check_eta_schedule(eta_schedule, eta_end, total_steps=1)  # a bad eta_end fails here, not at the first step
    if total is None:
        return optimizer, ScheduleAtFirstStep(optimizer, build)
    return optimizer, build(total)


OPTIMIZER_NAMES = ("softadam", "adamw", "adam", "sgd")


def build_optimizers(
    name: str,
    model: torch.nn.Module,
    args: TrainingArguments,
    num_training_steps: Optional[int] = None,
    lr_scheduler_type: Optional[str] = None,
    momentum: float = 0.9,
    **softadam_kwargs: Any,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """`(optimizer, schedule)` by name, so that baselines run through the same code.

    `softadam` is `create_optimizer_and_scheduler`; `adamw` is torch's AdamW
    and `adam` torch's Adam (weight decay added to the gradient, as the AWD-LSTM
    recipe's Adam does), both with `args`' betas and eps; `sgd` is torch's SGD with
    `momentum`. All use Trainer's weight-decay groups and the same schedule choice.
    """
    if name == "softadam":
        return create_optimizer_and_scheduler(model, args, num_training_steps, lr_scheduler_type, **softadam_kwargs)
    if softadam_kwargs:
        raise TypeError(f"{sorted(softadam_kwargs)} only apply to softadam, not {name}")
    _refuse_under_deepspeed(args)
    groups = decay_parameter_groups(model, args.weight_decay)
    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )
    elif name == "adam":
        optimizer = torch.optim.Adam(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )
    elif name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate, momentum=momentum)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    return optimizer, create_scheduler(optimizer, args, num_training_steps, lr_scheduler_type)


def available_reporters() -> str:
    """`report_to` for TrainingArguments: TensorBoard when it is installed, else nothing."""
    has_tensorboard = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    return "tensorboard" if has_tensorboard else "none"


def add_optimizer_arguments(
    parser: argparse.ArgumentParser,
    *,
    lr: Optional[float],
    weight_decay: float,
    momentum: Optional[float] = 0.9,
    lr_scheduler: Optional[str] = "linear",
) -> None:
    """The optimizer options the example scripts share (read by `optimizers_from_cli`).
    A default of None (lr, momentum, lr_scheduler): the script fills it in (e.g. from a preset)."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="softadam")
    group.add_argument(
        "--lr",
        type=float,
        default=lr,
        help=f"peak learning rate (default: {lr if lr is not None else 'per optimizer and preset'})",
    )
    group.add_argument(
        "--momentum",
        type=float,
        default=momentum,
        help=f"SGD's momentum (default: {momentum if momentum is not None else 'per preset'})",
    )
    group.add_argument("--eta", type=float, default=1.0, help="SoftAdam's eta (default: 1.0)")
    group.add_argument(
        "--eta-schedule",
        choices=HF_ETA_SCHEDULES,
        default="constant",
        help="move SoftAdam's eta from --eta to --eta-end over training (default: constant)",
    )
    group.add_argument(
        "--eta-end", type=float, default=None, help="eta at the end of a linear or cosine --eta-schedule"
    )
    group.add_argument("--weight-decay", type=float, default=weight_decay)
    group.add_argument(
        "--lr-scheduler", choices=SCHEDULE_NAMES, default=lr_scheduler, help=f"default: {lr_scheduler or 'per model'}"
    )
    group.add_argument("--warmup-steps", type=float, default=0, help=">= 1: steps; < 1: fraction of training")


# TrainingArguments' names for the example scripts' options, which transformers' own
# example scripts (HfArgumentParser) spell this way.
TRAINER_SPELLINGS = {
    "--learning_rate": "--lr",
    "--max_steps": "--max-steps",
    "--num_train_epochs": "--epochs",
    "--per_device_train_batch_size": "--batch-size",
    "--output_dir": "--output-dir",
    "--weight_decay": "--weight-decay",
    "--warmup_steps": "--warmup-steps",
    "--max_grad_norm": "--max-grad-norm",
    "--lr_scheduler_type": "--lr-scheduler",
    "--eval_steps": "--eval-steps",
}


def normalize_trainer_spellings(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with TrainingArguments' spellings of ``parser``'s options (``--learning_rate``,
    ``--max_steps``, ..., and any option with underscores for dashes) rewritten as the
    parser spells them; everything else, and all after a bare ``--``, is left as it is."""
    options = {option for action in parser._actions for option in action.option_strings}
    out: list[str] = []
    for index, token in enumerate(argv):
        if token == "--":
            return out + list(argv[index:])
        name, equals, value = token.partition("=")
        if token.startswith("--") and name not in options:
            spelled = TRAINER_SPELLINGS.get(name, name.replace("_", "-"))
            if spelled in options:
                token = spelled + equals + value
        out.append(token)
    return out


def add_deepspeed_argument(parser: Any) -> None:
    """`--deepspeed CONFIG` for the example scripts (read by `trainer_optimizer_arguments`)."""
    parser.add_argument(
        "--deepspeed",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="train under DeepSpeed with this JSON config (ZeRO stage 0, 1 or 2; launch with "
        "torchrun or deepspeed); SoftAdam then reaches Trainer as optimizer_cls_and_kwargs",
    )


def deepspeed_cli_error(cli_args: argparse.Namespace) -> Optional[str]:
    """What is wrong with `--deepspeed` and the options it cannot go with, if anything."""
    if not getattr(cli_args, "deepspeed", None):
        return None
    if not cli_args.deepspeed.is_file():
        return f"--deepspeed {cli_args.deepspeed}: no such file"
    if cli_args.lr_scheduler == STEP_SCHEDULE or getattr(cli_args, "eta_schedule", "constant") != "constant":
        return (
            "--deepspeed: Trainer builds the learning-rate schedule itself there, so --lr-scheduler step and "
            "--eta-schedule are not available; pick a transformers schedule (--lr-scheduler linear, ...)"
        )
    return None


def trainer_schedule_name(cli_args: argparse.Namespace) -> str:
    """A name TrainingArguments accepts: it does not know "step", which the schedule
    built by `optimizers_from_cli` handles itself."""
    return "linear" if cli_args.lr_scheduler == STEP_SCHEDULE else cli_args.lr_scheduler


def optimizers_from_cli(
    cli_args: argparse.Namespace,
    model: torch.nn.Module,
    training_args: TrainingArguments,
    num_training_steps: Optional[int] = None,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """`Trainer(optimizers=...)` from the options of `add_optimizer_arguments`;
    `num_training_steps` as in `create_scheduler` (default: `max_steps`)."""
    extra = {"eta": cli_args.eta} if cli_args.optimizer == "softadam" else {}
    if cli_args.optimizer == "softadam" and getattr(cli_args, "eta_schedule", "constant") != "constant":
        extra.update(eta_schedule=cli_args.eta_schedule, eta_end=cli_args.eta_end)
    if cli_args.optimizer == "sgd":
        extra = {"momentum": cli_args.momentum}
    return build_optimizers(
        cli_args.optimizer, model, training_args, num_training_steps, lr_scheduler_type=cli_args.lr_scheduler, **extra
    )


def trainer_optimizer_arguments(
    cli_args: argparse.Namespace,
    model: torch.nn.Module,
    training_args: TrainingArguments,
    num_training_steps: Optional[int] = None,
) -> dict[str, Any]:
    """Trainer's keyword argument for the optimizer of `add_optimizer_arguments`' options.

    `{"optimizers": (optimizer, schedule)}` (`optimizers_from_cli`), or under DeepSpeed
    (`training_args.deepspeed` set), where Trainer keeps only an optimizer it builds itself,
    `{"optimizer_cls_and_kwargs": ...}`: Trainer then makes the weight-decay groups and the
    learning-rate schedule from `training_args`, so the paper's `"step"` schedule and eta
    schedules are refused there with a ValueError.
    """
    if not getattr(training_args, "deepspeed", None):
        return {"optimizers": optimizers_from_cli(cli_args, model, training_args, num_training_steps)}
    if cli_args.lr_scheduler == STEP_SCHEDULE or getattr(cli_args, "eta_schedule", "constant") != "constant":
        raise ValueError(
            "under DeepSpeed, Trainer builds the learning-rate schedule itself: the 'step' schedule "
            "and eta schedules are not available there (choose --lr-scheduler from transformers' "
            "names, and a constant eta)"
        )
    betas = {"betas": (training_args.adam_beta1, training_args.adam_beta2), "eps": training_args.adam_epsilon}
    classes: dict[str, tuple[type, dict[str, Any]]] = {
        "adamw": (torch.optim.AdamW, betas),
        "adam": (torch.optim.Adam, betas),
        "sgd": (torch.optim.SGD, {"momentum": cli_args.momentum}),
    }
    if cli_args.optimizer == "softadam":
        return {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(training_args, eta=cli_args.eta)}
    cls, kwargs = classes[cli_args.optimizer]
    return {"optimizer_cls_and_kwargs": (cls, {"lr": training_args.learning_rate, **kwargs})}


def training_arguments_cli(training_args: TrainingArguments) -> list[str]:
    """Command-line flags, as transformers' HfArgumentParser spells them, that rebuild
    `training_args`: the fields that differ from TrainingArguments' defaults.

    Raises ValueError unless the installed transformers parses the flags back into the
    same arguments, so a printed command is one that transformers accepts."""
    from transformers import HfArgumentParser

    defaults = TrainingArguments(output_dir=training_args.output_dir).to_dict()
    wanted = training_args.to_dict()
    flags = ["--output_dir", str(training_args.output_dir)]
    for name, value in wanted.items():
        if name == "output_dir" or value == defaults.get(name) or value is None:
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(str(v) for v in values)]
    try:
        (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(flags)
    except (SystemExit, ValueError) as error:
        raise ValueError(f"transformers rejects the flags {flags}: {error}") from None
    differing = {k: (v, parsed.to_dict().get(k)) for k, v in wanted.items() if parsed.to_dict().get(k) != v}
    if differing:
        raise ValueError(f"the flags do not rebuild these TrainingArguments fields (wanted, parsed): {differing}")
    return flags
