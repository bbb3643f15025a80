"""`--optimizer softadam` for fairseq: a thin adapter over softadam_nlp.SoftAdam.

Modelled on fairseq/optim/adam.py: a dataclass config whose fields become the
`--softadam-*` command-line options (and the keys of `optimizer:` in
fairseq-hydra-train yaml), and a FairseqOptimizer that maps them to the torch
optimizer. The update math lives only in softadam_nlp.
"""

import ast
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from softadam_nlp import SoftAdam
from softadam_nlp.eta_schedule import TOOLKIT_ETA_SCHEDULES, check_eta_schedule, eta_at

# SoftAdam's argument name -> the fairseq option that sets it, for error messages.
_OPTION_FOR_ARGUMENT = {
    "lr": "--lr",
    "betas": "--softadam-betas",
    "eps": "--softadam-eps",
    "eta": "--softadam-eta",
    "weight_decay": "--weight-decay",
    "nonfinite": "--softadam-nonfinite",
}


@dataclass
class FairseqSoftAdamConfig(FairseqDataclass):
    softadam_betas: Any = field(
        default=(0.9, 0.999),
        metadata={"help": "betas (beta1, beta2): momentum and second-moment decay, each in [0, 1)"},
    )
    softadam_eps: float = field(
        default=1e-8, metadata={"help": "epsilon; its square is added to the per-tensor mean of v"}
    )
    softadam_eta: float = field(
        default=1.0,
        metadata={"help": "eta >= 0: 0 is SGD with dampened momentum, larger values move towards Adam"},
    )
    softadam_nesterov: bool = field(default=False, metadata={"help": "use the Nesterov numerator"})
    softadam_eta_schedule: ChoiceEnum(list(TOOLKIT_ETA_SCHEDULES)) = field(  # type: ignore[valid-type]
        default="constant",
        metadata={"help": "move eta from --softadam-eta to --softadam-eta-end over --max-update updates"},
    )
    softadam_eta_end: Optional[float] = field(
        default=None, metadata={"help": "eta at --max-update, for a linear or cosine --softadam-eta-schedule"}
    )
    softadam_nonfinite: str = field(
        default="raise",
        metadata={
            "help": "a step with a NaN/inf gradient: 'raise' an error, or 'skip' it (parameters and "
            "state untouched either way); fairseq's --fp16/--amp scalers skip such steps themselves"
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (as in AdamW)"})
    lr: list[float] = II("optimization.lr")
    max_update: int = II("optimization.max_update")


def _parse_betas(value: Any) -> tuple[float, float]:
    """'(0.9, 0.999)' from the command line, or a list/tuple from yaml or Python."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--softadam-betas must look like '(0.9, 0.999)', got {value!r}") from None
    elif not isinstance(value, (tuple, list)):
        value = OmegaConf.to_container(value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"--softadam-betas must be a pair (beta1, beta2), got {value!r}")
    return float(value[0]), float(value[1])


@register_optimizer("softadam", dataclass=FairseqSoftAdamConfig)
class FairseqSoftAdam(FairseqOptimizer):
    """SoftAdam for fairseq. See softadam_nlp.SoftAdam for the algorithm.

    Wrapper contract, as for fairseq's adam:
    - `--memory-efficient-fp16/bf16`: supported; SoftAdam keeps float32 state for
      16-bit parameters and writes the result back itself.
    - `--fp16` with flattened parameters: refused (`supports_flat_params` is
      False, so fairseq asks for `--fp16-no-flatten-grads`). One flat buffer would
      turn the per-tensor mean of v into a mean over the whole model.
    """

    def __init__(self, cfg: FairseqSoftAdamConfig, params) -> None:
        super().__init__(cfg)
        try:
            self._optimizer = SoftAdam(params, **self.optimizer_config)
        except ValueError as error:
            # SoftAdam says "Invalid NAME=...": name the fairseq option instead.
            argument = re.match(r"Invalid (\w+)", str(error))
            option = _OPTION_FOR_ARGUMENT.get(argument.group(1)) if argument else None
            if option is None:
                raise
            raise ValueError(f"{option}: {error}") from None
        if self.cfg.softadam_eta_schedule != "constant":
            try:
                check_eta_schedule(self.cfg.softadam_eta_schedule, self.cfg.softadam_eta_end, self.cfg.max_update)
            except ValueError as error:
                raise ValueError(
                    f"--softadam-eta-schedule {self.cfg.softadam_eta_schedule} (with "
                    f"--softadam-eta-end and --max-update): {error}"
                ) from None
        # fairseq's memory-efficient wrapper, after load_state_dict, would put the
        # checkpoint's tensors (loaded on the CPU) back into the state unmoved; SoftAdam's
        # own load_state_dict already restores float32 moments on the parameters' device.
        self._optimizer.disable_mem_eff_fp16_loading_hack = True

    @property
    def optimizer_config(self) -> dict[str, Any]:
        """The kwargs that override those stored in a checkpoint when resuming (fairseq contract)."""
        return {
            "lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
            "betas": _parse_betas(self.cfg.softadam_betas),
            "eps": self.cfg.softadam_eps,
            "eta": self.cfg.softadam_eta,
            "weight_decay": self.cfg.weight_decay,
            "nesterov": self.cfg.softadam_nesterov,
            "nonfinite": self.cfg.softadam_nonfinite,
        }

    def step(self, closure=None, scale=1.0, groups=None) -> None:
        """One update, at the eta --softadam-eta-schedule gives for it. The update count is
        SoftAdam's own step state, which checkpoints keep, so a resumed run continues the
        schedule where it was."""
        if self.cfg.softadam_eta_schedule != "constant":
            done = max((int(s["step"]) for s in self._optimizer.state.values() if "step" in s), default=0)
            eta = eta_at(
                done,
                self.cfg.softadam_eta_schedule,
                self.cfg.softadam_eta,
                self.cfg.softadam_eta_end,
                self.cfg.max_update,
            )
            for group in self._optimizer.param_groups:
                group["eta"] = eta
        super().step(closure, scale=scale, groups=groups)

    @property
    def supports_memory_efficient_fp16(self) -> bool:
        return True

    @property
    def supports_flat_params(self) -> bool:
        return False

    def average_params(self) -> None:
        """Average the moments across workers (used by BMUF distributed training). Each
        worker's mean of v is then rebuilt from the averaged v, so that all of them step
        with the same one."""
        world_size = float(dist.get_world_size())
        for state in self.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] /= world_size
                dist.all_reduce(state[key], op=dist.ReduceOp.SUM)
        self._optimizer.rebuild_exp_avg_sq_means()


__all__ = ["FairseqSoftAdam", "FairseqSoftAdamConfig"]
