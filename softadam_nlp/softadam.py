r"""SoftAdam: one optimizer that interpolates SGD with momentum and Adam.

"SoftAdam: Unifying SGD and Adam for better stochastic gradient descent"
(ICLR 2020 submission), Algorithm 1. This module is the one source of the update
math in the package: the fairseq and transformers adapters wrap `SoftAdam`.

Layout follows `torch/optim/adam.py`: the `SoftAdam` class gathers state
per parameter group and calls the functional `softadam`, which dispatches to a
per-tensor execution (`_single_tensor_softadam`), a multi-tensor
`torch._foreach_*` execution (`_multi_tensor_softadam`), a fused CPU kernel
(`_fused_softadam`, C++ in `csrc/`) or fused GPU kernels (Triton, `_triton.py`).
All of them use the step coefficients of `_step_coefficients` (the GPU kernels
compute the same float64 expressions on the device), so the scalar part of the
algorithm is written once; the per-tensor and foreach executions are the readable
reference that the fused ones are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _default_to_fused_or_foreach,
    _get_scalar_dtype,
    _get_value,
    _to_scalar,
    _use_grad_for_differentiable,
)

from softadam_nlp._fused import fused_cpu_kernel, fused_cpu_unavailable_reason
from softadam_nlp.layout import _PLAIN_TYPES, GroupLayout, TensorLayout, local, tensor_layout

__all__ = ["SoftAdam", "softadam"]

# Parameters stored in these dtypes keep their optimizer state (and do the update
# arithmetic) in float32: a bfloat16 second moment cannot resolve the tiny
# (1 - beta2) increments, and its per-tensor mean would be badly rounded.
_LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def _state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of the moment buffers (and of the update arithmetic) for `param`."""
    return torch.float32 if param.dtype in _LOW_PRECISION_DTYPES else param.dtype


# The dtypes the fused GPU kernels step (softadam_nlp/_triton.py, imported on first use:
# importing triton takes a while, and CPU-only runs never need it).
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The suite sets this (with TRITON_INTERPRET=1) to run the GPU kernels on CPU tensors.
_TRITON_ON_CPU = False


def _triton_unavailable_reason(device: torch.device) -> Optional[str]:
    try:
        from softadam_nlp._triton import triton_unavailable_reason
    except ImportError as error:  # pragma: no cover
        return f"cannot be imported ({error})"
    return triton_unavailable_reason(device)


# State tensors whose dtype is not the parameter's, and the dtype each is kept in.
_STATE_DTYPE_KEYS: dict[str, Callable[[Tensor], torch.dtype]] = {
    "exp_avg": _state_dtype,
    "exp_avg_sq": _state_dtype,
}

# The key of `state_dict()` that carries the means of v of whole plain tensors, beside
# "state" and "param_groups" (which hold only AdamW's keys). Checkpoints of 0.1.0 and of
# 0.2.0 before the change kept a mean per stepped tensor inside "state", under the name of
# `_OLD_MEAN_KEY`.
_MEANS_KEY = "exp_avg_sq_means"
_OLD_MEAN_KEY = "exp_avg_sq_mean"


@dataclass
class _KeptMean:
    """The float64 mean of v of the whole original tensor(s) that a stepped tensor holds
    pieces of, as of its last step: 0-dim, or one entry per piece (layout.py). It is valid
    only for the very `exp_avg_sq` it was taken from, unchanged since (`version`)."""

    value: Tensor
    exp_avg_sq: Tensor
    version: int

    def valid_for(self, exp_avg_sq: Tensor) -> bool:
        return exp_avg_sq is self.exp_avg_sq and local(exp_avg_sq)._version == self.version


class SoftAdam(Optimizer):
    r"""Implements SoftAdam (Algorithm 1 of the SoftAdam paper).

    $$
    \begin{aligned}
     &\textbf{input}: \alpha \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)},
         \eta \text{ (eta)}, \epsilon \text{ (eps)}, \lambda \text{ (weight decay)},
         \theta_0 \text{ (params)} \\
     &\textbf{initialize}: m_0 \leftarrow 0, \; v_0 \leftarrow 0 \\
     &\textbf{for}\; t = 1, 2, \ldots \;\textbf{do} \\
     &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
         \quad (-\nabla_\theta f_t \text{ if maximize}) \\
     &\quad m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
     &\quad \beta_{2,t} \leftarrow \min(\beta_2, 1 - 1/t) \\
     &\quad v_t \leftarrow \beta_{2,t} v_{t-1} + (1 - \beta_{2,t}) g_t^2 \\
     &\quad \bar v_t \leftarrow \operatorname{mean}(v_t)
         \quad \text{(over all elements of this tensor)} \\
     &\quad \gamma_t \leftarrow \sqrt{(1 - \beta_2) / (1 - \beta_{2,t})} \\
     &\quad d_t \leftarrow 1 + \eta - \eta\gamma_t
         + \eta\gamma_t \sqrt{v_t / (\bar v_t + \epsilon^2)} \\
     &\quad \theta_t \leftarrow \theta_{t-1} - \alpha\lambda\theta_{t-1} \\
     &\quad \theta_t \leftarrow \theta_t - \alpha (1 + \eta)\, n_t / d_t,
         \quad n_t = m_t \text{, or } \beta_1 m_t + (1 - \beta_1) g_t
         \text{ with nesterov} \\
     &\textbf{return}\; \theta_t
    \end{aligned}
    $$

    With `eta=0` the denominator is exactly 1 and the update is SGD with momentum
    `beta1` and dampening `beta1` (`buf = beta1*buf + (1-beta1)*g`, buffer
    starting at zero). As `eta` grows the step tends to an Adam-like step
    normalised per element by `sqrt(v)` relative to the tensor's RMS gradient.
    Because $0 < \gamma_t \le 1$ and $\eta \ge 0$, $d_t \ge 1$:
    no element ever takes a larger step than SGD's `lr*(1+eta)*m`. Early in
    training $\gamma_t$ is small, so the step is SGD-like while the second
    moment is still noisy; that is what lets SoftAdam train without warmup.

    Args:
        params: iterable of parameters or parameter groups (dicts).
        lr: learning rate $\alpha$ (default: 0.1, an SGD-like scale): a float, or a
            one-element tensor, read at every step (under `torch.compile` a tensor lr
            lets a schedule change it in place without recompiling the step).
        betas: $(\beta_1, \beta_2)$, each in [0, 1) (default: (0.9, 0.999)).
        eps: $\epsilon$; its square is added to $\bar v_t$ (default: 1e-8).
        eta: $\eta \ge 0$, the SGD (0) to Adam (large) blend (default: 1.0).
        weight_decay: decoupled weight decay $\lambda$, as in AdamW (default: 0).
        nesterov: use the Nesterov numerator (default: False).
        maximize: maximise the objective instead of minimising it (default: False).
        foreach: force the multi-tensor (True) or per-tensor (False) execution.
        fused: use (True) or never use (False) a fused execution. `None` (the
            default) picks one where it can: the fused CPU kernel when every parameter
            of a group is a contiguous CPU tensor and the kernel is available (it is
            compiled once per machine on first use and cached; `make setup` builds it
            ahead); the fused GPU kernels (Triton, compiled on the first step and
            cached by Triton across runs) when every parameter of a group is a float32,
            bfloat16 or float16 CUDA tensor. Otherwise it picks as `torch.optim`
            does: multi-tensor on devices with foreach kernels, per-tensor elsewhere.
            With `fused=True` a group that neither fused execution can step is an error.
        nonfinite: what a step does when a gradient holds NaN or inf (or overflows when
            squared): `"raise"` (default) a ValueError naming the parameter (pass
            `named_parameters()` for names), or `"skip"` the step, counted in
            `skipped_steps`. Either way no parameter or state changes, in any group:
            every gradient is checked before anything is written. Loss scalers
            (`torch.amp.GradScaler`) skip such steps before calling `step`. On the
            fused GPU execution `"skip"` decides on the device (a flag gates the
            kernels, as GradScaler's `found_inf` does), so a step never waits for the
            GPU; `"raise"` reads the decision back, once per step.

    A param group's tensors must be on one device (give each device a group of its own).
    Meta tensors step as in torch's optimizers: their state is made, nothing is read.

    Parameters in bfloat16 or float16 keep `exp_avg` and `exp_avg_sq` in
    float32 and do the update arithmetic in float32, rounding into the parameter
    once per step.

    Sharded and flattened parameters are stepped exactly: FSDP2's DTensors, FSDP1's
    FlatParameters and `use_orig_params` views, and DeepSpeed ZeRO-1/2's flat
    partitions. Every execution takes $\bar v_t$ over each whole original
    tensor, from the per-tensor sums of squared gradients all-reduced over the shards
    (`softadam_nlp/layout.py` maps each local piece to its original tensor). What
    cannot be mapped back, such as DeepSpeed ZeRO-3 or another wrapper's flat copies,
    is refused at the first step with a ValueError naming it.

    The fused executions (and every execution on sharded parameters) compute
    $\bar v_t$ without a pass over $v_t$, from $\bar v_t =
    \beta_{2,t} \bar v_{t-1} + (1 - \beta_{2,t}) \operatorname{mean}(g_t^2)$,
    keeping $\bar v$ in float64; it agrees with $\operatorname{mean}(v_t)$ to float
    rounding. That mean is derived from $v$, not state: `optimizer.state` holds
    AdamW's keys (`step`, `exp_avg`, `exp_avg_sq`), which every engine saves,
    gathers and reshards as it does AdamW's. After `load_state_dict`, or a change of
    $v$ or of the state outside `step` (see `rebuild_exp_avg_sq_means`), each
    $\bar v$ is rebuilt at the next step as the float64 sum of $v$ over its whole
    original tensor divided by its size; `state_dict()` carries the means of whole
    tensors (one process, DDP) beside the state, so that a resumed run continues bit
    for bit there. The fused GPU execution keeps each step
    counter on the parameter's device (the kernels read it there); the others keep it
    on the CPU, and a counter moves when the execution changes.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eta: float = 1.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        nonfinite: str = "raise",
    ) -> None:
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, eta=eta, weight_decay=weight_decay)
        _check_nonfinite(nonfinite)
        defaults = dict(
            lr=_to_scalar(lr),
            betas=tuple(betas),
            eps=eps,
            eta=eta,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            nonfinite=nonfinite,
            # Read by torch's _use_grad_for_differentiable; SoftAdam is not differentiable.
            differentiable=False,
        )
        self._built_with: list[list[Tensor]] = []  # each group's tensors as added (layout.py)
        # Per group, from its first step: its tensors, their layouts, a GroupLayout per set stepped.
        self._layouts: dict[int, tuple[list[Tensor], list[TensorLayout], dict[tuple[int, ...], GroupLayout]]] = {}
        self._group_index: dict[int, int] = {}  # id(group dict) -> its position when added
        # The means of v of the fused and sharded executions (derived from v, not state),
        # and the groups whose means every rank rebuilds from v at their next step.
        self._kept_means: dict[Tensor, _KeptMean] = {}
        self._means_to_rebuild: set[int] = set()
        super().__init__(params, defaults)
        self._skipped_on_host = 0  # steps refused by nonfinite="skip" decided on the host
        self._skipped_on_device: Optional[Tensor] = None  # ... and on the device (fused GPU)
        if fused and foreach is not None:
            raise ValueError(f"fused=True cannot be combined with foreach={foreach}: pick one execution")
        on_cpu = any(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
        if fused and on_cpu and fused_cpu_kernel() is None:
            raise RuntimeError(f"fused=True, but SoftAdam's fused CPU kernel {fused_cpu_unavailable_reason()}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Groups may override any hyperparameter: validate each group, not only the
        # defaults, so a bad per-group value fails here rather than mid-training.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = _to_scalar(group["lr"])  # a 1-element Tensor lr is kept as a 0-dim tensor
        _check_hyperparameters(
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            eta=group["eta"],
            weight_decay=group["weight_decay"],
        )
        _check_nonfinite(group["nonfinite"])
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError("SoftAdam does not support complex parameters")
        # Engines that replace a group's tensors with flat partitions (DeepSpeed ZeRO-1/2)
        # are mapped back to whole tensors through the tensors the group was built with.
        self._built_with.append(list(group["params"]))
        # DeepSpeed ZeRO-1/2 steps one group at a time, with param_groups set to [that group]:
        # a group is known by its dict, not by its position in param_groups.
        self._group_index[id(group)] = len(self._built_with) - 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("nonfinite", "raise")
            group.setdefault("differentiable", False)
        # Saved as one number; an instance attribute of that name would hide the property.
        self._skipped_on_host = int(self.__dict__.pop("skipped_steps", self.__dict__.get("_skipped_on_host", 0)))
        self.__dict__.setdefault("_skipped_on_device", None)
        self.__dict__.setdefault("_built_with", [list(group["params"]) for group in self.param_groups])
        self.__dict__.setdefault("_layouts", {})
        # Also called by load_state_dict, which makes new group dicts.
        self._group_index = {id(group): i for i, group in enumerate(self.param_groups)}
        # Pickles and deep copies carry the kept means (__getstate__), each with the v it is
        # the mean of; the copy's v is a new tensor, whose version counter starts afresh.
        kept = self.__dict__.pop("kept_means", None)
        if kept is not None or "_kept_means" not in self.__dict__:
            self._kept_means = {p: _KeptMean(value, v, local(v)._version) for p, (value, v) in (kept or {}).items()}
        self.__dict__.setdefault("_means_to_rebuild", set())
        # Older optimizers pickled whole kept the means in the state, where engines cannot carry them.
        for param_state in self.state.values():
            if param_state.pop(_OLD_MEAN_KEY, None) is not None:
                self._means_to_rebuild.update(range(len(self.param_groups)))
        # The step counter is a CPU tensor of each parameter's own, as _state_of makes it:
        # older checkpoints and other tools store a Python number, torch's load_state_dict
        # moves it to the parameter's device for groups with fused=True, and otherwise keeps
        # the loaded tensor itself, which may be shared: with the caller's state dict, and
        # among tensors (FSDP1's full optimizer state gives every tensor of a FlatParameter
        # one 0-dim tensor), where it would count once for all of them.
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None:
                param_state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles (and deep-copies) defaults, state and param_groups only;
        # the count of skipped steps is part of the optimizer's public record too, and the
        # kept means let a copy continue bit for bit as the original does.
        kept = {
            p: (mean.value, mean.exp_avg_sq)
            for p, mean in self._kept_means.items()
            if mean.valid_for(self.state.get(p, {}).get("exp_avg_sq"))
        }
        return {**super().__getstate__(), "skipped_steps": self.skipped_steps, "kept_means": kept}

    @property
    def skipped_steps(self) -> int:
        """Steps refused by `nonfinite="skip"` (reading it waits for the GPU where the
        fused GPU execution decided on the device)."""
        on_device = self._skipped_on_device
        return self._skipped_on_host + (int(on_device.item()) if on_device is not None else 0)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_on_host, self._skipped_on_device = int(value), None

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, as `torch.optim.Optimizer.state_dict` gives it.

        "state" holds AdamW's keys only (`step`, `exp_avg`, `exp_avg_sq`), in the shapes
        of the tensors SoftAdam steps, so that every engine's gather, scatter, reshard
        and conversion handles it as it handles AdamW's. The running means of v of whole
        plain tensors (one process, DDP) ride beside it under "exp_avg_sq_means" (saved
        parameter id -> float64 0-dim tensor), so that a resumed run continues bit for
        bit; every other mean is rebuilt from v after loading (`load_state_dict`).
        """
        state_dict = super().state_dict()
        means = {}
        for position, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            whole = self._whole_plain_tensors(self._group_index.get(id(group), position))
            for p, param_id in zip(group["params"], saved["params"]):
                mean = self._kept_means.get(p)
                if (
                    mean is not None
                    and id(p) in whole
                    and mean.value.dim() == 0
                    and mean.valid_for(self.state.get(p, {}).get("exp_avg_sq"))
                ):
                    means[param_id] = mean.value
        if means:
            state_dict[_MEANS_KEY] = means
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, keeping float32 moments for low-precision parameters.

        `torch.optim.Optimizer.load_state_dict` casts every floating-point state
        tensor to its parameter's dtype, which would round the float32 moments of a
        bfloat16 parameter to bfloat16 and break bit-exact resumption. These tensors are
        therefore restored from the saved ones at their own dtypes.

        The means of v start again from the loaded v: each is rebuilt at the next step
        as the float64 sum of `exp_avg_sq` over its whole original tensor (every piece,
        on every rank) divided by the tensor's size, whatever layout wrote the state. The
        one exception is a whole plain tensor (one process, DDP) whose mean was saved
        beside its state ("exp_avg_sq_means", or state "exp_avg_sq_mean" of older
        checkpoints): that v is the one the mean was taken from, and the run continues bit
        for bit. A saved per-piece mean (FSDP1 FlatParameters and DeepSpeed partitions
        in older checkpoints) is dropped: it belongs to the layout that wrote it.

        Each step counter becomes the parameter's own CPU tensor, copied from the loaded
        one (FSDP1's full optimizer state shares one tensor among the tensors of a
        FlatParameter, and torch would keep it shared, with the caller's dict too).
        """
        saved_means = dict(state_dict.get(_MEANS_KEY, {}))
        for param_id, state in state_dict["state"].items():
            old = state.get(_OLD_MEAN_KEY)
            if isinstance(old, Tensor) and old.dim() == 0:
                saved_means.setdefault(param_id, old)
        state_dict = {
            **state_dict,
            "state": {
                param_id: {k: v for k, v in state.items() if k != _OLD_MEAN_KEY}
                for param_id, state in state_dict["state"].items()
            },
        }
        saved_moments = {
            param_id: {k: state[k] for k in _STATE_DTYPE_KEYS if k in state}
            for param_id, state in state_dict["state"].items()
        }
        saved_ids = [[pid for pid in group["params"]] for group in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        self._kept_means = {}
        self._means_to_rebuild = set(range(len(self._built_with)))
        for position, (group, ids) in enumerate(zip(self.param_groups, saved_ids)):
            whole = self._whole_plain_tensors(self._group_index.get(id(group), position))
            for param_id, param in zip(ids, group["params"]):
                for key, value in saved_moments.get(param_id, {}).items():
                    self.state[param][key] = value.to(
                        device=param.device, dtype=_STATE_DTYPE_KEYS[key](param), copy=True
                    )
                mean = saved_means.get(param_id)
                exp_avg_sq = self.state.get(param, {}).get("exp_avg_sq")
                if mean is not None and id(param) in whole and exp_avg_sq is not None:
                    value = mean.to(device=param.device, dtype=torch.float64, copy=True)
                    self._kept_means[param] = _KeptMean(value, exp_avg_sq, local(exp_avg_sq)._version)

    def rebuild_exp_avg_sq_means(self) -> None:
        """Rebuild every tensor's mean of v from v itself at its next step.

        The fused executions, and every execution on sharded parameters, carry the mean
        of v over each original tensor from step to step rather than take it from v.
        Call this after changing `exp_avg_sq` in `state` outside `step` (averaging it
        across workers, as fairseq's BMUF does, or editing it by hand). `load_state_dict`
        does it itself, and a state tensor that was replaced, or changed in place by a
        torch operation, is noticed without it; a write through `.data` or a raw kernel
        is not. Where parameters are sharded, call it on every rank: the rebuild adds up
        the sums of v across ranks.
        """
        self._kept_means = {}
        self._means_to_rebuild = set(range(len(self._built_with)))

    def _whole_plain_tensors(self, index: int) -> set[int]:
        """ids of the tensors of param group `index` that are whole, plain tensors, as the
        group was built: their mean of v is one number that only their own v gives."""
        built = self._built_with[index] if index < len(self._built_with) else []
        return {
            id(p)
            for p in built
            if type(p) in _PLAIN_TYPES
            and not getattr(p, "_is_flat_param", False)
            and not getattr(p, "_fsdp_flattened", False)
        }

    def _fused_execution(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> Optional[str]:
        """The fused execution of this step of `group`: `"cpu"` (the C++ kernel),
        `"gpu"` (the Triton kernels) or None for the per-tensor or foreach execution (see
        `fused` in the class doc). `params` and `grads` are the local tensors (or pieces)
        the execution would update."""
        # An explicit foreach=True/False asks for that execution; fused needs None there.
        if group["fused"] is False or group["foreach"] is not None or not params:
            return None
        compiling = torch.compiler.is_compiling()
        device = params[0].device
        if device.type == "cuda" or (_TRITON_ON_CPU and device.type == "cpu"):
            reason = None if not compiling else "cannot run inside torch.compile"
            reason = reason or _triton_unavailable_reason(device)
            if reason is None and not all(
                type(t) in _PLAIN_TYPES and t.dtype in _TRITON_DTYPES and t.device == device for t in params
            ):
                reason = "steps float32, bfloat16 and float16 parameters (float64 keeps to the foreach execution)"
            if reason is None and not all(g.dtype == p.dtype for p, g in zip(params, grads)):
                reason = "needs gradients in their parameters' dtype"
            if reason is None:
                return "gpu"
            if group["fused"]:
                raise RuntimeError(f"fused=True, but SoftAdam's fused GPU execution {reason}; use fused=None")
            return None
        # The kernel reads raw memory: plain contiguous CPU tensors, which the local pieces
        # of sharded and flattened parameters are (layout.py).
        supported = not compiling and all(
            _kernel_can_update(p) and _kernel_can_update(g) for p, g in zip(params, grads)
        )
        if group["fused"] and not supported:
            raise RuntimeError(
                "fused=True needs contiguous CPU parameters and gradients (plain tensors, or DTensors "
                "sharded or replicated over their mesh), or CUDA parameters (all of a group on one "
                "device), outside torch.compile; use fused=None to fall back to the other executions"
            )
        return "cpu" if supported and fused_cpu_kernel() is not None else None

    def _plan(self, index: int, group: dict[str, Any]) -> _StepPlan:
        """The tensors of `group` that this step updates, with their layout (layout.py)."""
        params = group["params"]
        stepped = [i for i, p in enumerate(params) if p.grad is not None]
        if any(params[i].grad.is_sparse for i in stepped):
            raise RuntimeError(
                "SoftAdam does not support sparse gradients: the per-tensor mean of "
                "the second moment needs every element (use a dense embedding)"
            )
        cached = self._layouts.get(index)
        if cached is None or len(cached[0]) != len(params) or any(a is not b for a, b in zip(cached[0], params)):
            _check_one_device(params, index)
            built_with = self._built_with[index] if index < len(self._built_with) else params
            names = group.get("param_names")
            built_names = [
                f"'{names[i]}'" if names and len(names) == len(built_with) else f"{i} of param group {index}"
                for i in range(len(built_with))
            ]
            layouts = [
                tensor_layout(
                    p,
                    built_names[i] if i < len(built_with) and built_with[i] is p else f"{i} of param group {index}",
                    built_with,
                    built_names,
                )
                for i, p in enumerate(params)
            ]
            if torch.compiler.is_compiling() and any(layout.engine != "plain" for layout in layouts):
                raise RuntimeError("torch.compile of a SoftAdam step supports plain (unsharded) parameters only")
            cached = (list(params), layouts, {})
            if not torch.compiler.is_compiling():
                self._layouts[index] = cached
        # Which tensors have a gradient rarely changes: one GroupLayout per such set.
        group_layouts = cached[2]
        layout = group_layouts.get(tuple(stepped))
        if layout is None:
            device = local(params[0]).device if params else torch.device("cpu")
            layout = group_layouts[tuple(stepped)] = GroupLayout(cached[1], stepped, device)
        stepped_params = [params[i] for i in stepped]
        return _StepPlan(index, stepped_params, [p.grad for p in stepped_params], layout)

    def _state_of(self, plan: _StepPlan, step_device: torch.device) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per stepped tensor: exp_avg, exp_avg_sq and the step counter, created on first
        use, the counter on `step_device` (where the execution reads it)."""
        exp_avgs, exp_avg_sqs, state_steps = [], [], []
        for p in plan.params:
            state = self.state[p]
            if len(state) == 0:
                # The step counter lives on the CPU, like torch's non-capturable Adam, where
                # it only feeds scalar coefficients; the fused GPU kernels read it on the device.
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device=step_device)
                state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            elif state["step"].device != step_device:
                state["step"] = state["step"].to(step_device)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, state_steps

    def _exp_avg_sq_means(self, plan: _StepPlan, exp_avg_sqs: list[Tensor], keep: bool) -> Optional[list[Tensor]]:
        """Per entry (layout.py), the float64 `mean(v)` of its whole original tensor as of the
        previous step, when `keep` (the fused executions, and every execution where the
        mean needs ranks to add up, carry it): one 0-dim tensor per stepped tensor, or one
        entry per piece for tensors that hold several. Otherwise None, and the kept means
        are dropped: another execution is about to update `v` without them.

        A mean that is missing, or not valid for the `v` beside it, is rebuilt from `v`:
        zero for new state; otherwise the sum of `v` over the whole original tensor (its
        local pieces and, where it is sharded, across ranks) divided by its size. After
        `load_state_dict` every rank rebuilds all of a sharded group's means at once, so
        that each takes part in the all-reduce, also a rank that steps nothing of it."""
        everything = plan.index in self._means_to_rebuild and bool(plan.layout.domains)
        self._means_to_rebuild.discard(plan.index)
        if not keep:
            for p in plan.params:
                self._kept_means.pop(p, None)
            return None
        layout = plan.layout
        kept: list[Optional[Tensor]] = [None] * len(plan.params)
        if not everything:
            for k, (p, v) in enumerate(zip(plan.params, exp_avg_sqs)):
                mean = self._kept_means.get(p)
                kept[k] = mean.value if mean is not None and mean.valid_for(v) else None
        missing = [k for k, mean in enumerate(kept) if mean is None]
        if missing and not everything and all(self.state[plan.params[k]]["step"] == 0 for k in missing):
            # New state: v is zero, and so is its mean. No all-reduce, which matters where a
            # rank holds no piece of any tensor of a group and so would not take part in it.
            for k in missing:
                multi = layout.layouts[layout.stepped[k]].pieces is not None
                kept[k] = torch.zeros(
                    layout.pieces_per_tensor[k] if multi else (),
                    dtype=torch.float64,
                    device=local(plan.params[k]).device,
                )
        elif missing or everything:
            sums, _ = layout.whole_sums(_sums(layout.views(exp_avg_sqs)))
            means = sums / torch.tensor(layout.whole_numels, dtype=torch.float64, device=sums.device)
            start = 0
            for k, count in enumerate(layout.pieces_per_tensor):
                if kept[k] is None:
                    value = means[start : start + count].clone()
                    kept[k] = value if layout.layouts[layout.stepped[k]].pieces is not None else value.reshape(())
                start += count
        for k in missing:
            # The version is taken after the step (_note_means_current), which changes v.
            self._kept_means[plan.params[k]] = _KeptMean(kept[k], exp_avg_sqs[k], -1)
        out: list[Tensor] = []
        for mean in kept:
            out.extend(mean.unbind() if mean.dim() else [mean])
        return out

    def _note_means_current(self, plan: _StepPlan) -> None:
        """After a step that advanced the kept means: they are the means of v as it is now."""
        for p in plan.params:
            mean = self._kept_means.get(p)
            if mean is not None:
                mean.version = local(mean.exp_avg_sq)._version

    @_use_grad_for_differentiable
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every gradient is checked before anything is written, so that a refused step leaves
        # parameters and state as they were: one non-finite element would otherwise make
        # the mean of v, and with it every element's step, of its whole tensor NaN. The sums
        # are over whole original tensors (added up across ranks where they are sharded), so
        # every rank takes the same decision.
        plans = [
            self._plan(self._group_index.get(id(group), position), group)
            for position, group in enumerate(self.param_groups)
        ]
        views = [(plan.layout.views(plan.params), plan.layout.views(plan.grads)) for plan in plans]
        executions = [
            self._fused_execution(group, params, grads) for group, (params, grads) in zip(self.param_groups, views)
        ]
        grad_sq_sums = [
            plan.layout.whole_sums(_sums(grads, square=True, kernel_checked=execution == "cpu"))
            for plan, (_, grads), execution in zip(plans, views, executions)
        ]
        found_inf = None
        if (
            executions
            and all(e == "gpu" for e in executions)
            and all(g["nonfinite"] == "skip" for g in self.param_groups)
        ):
            # Decided on the device: a flag gates the kernels, and nothing waits for the GPU.
            found_inf = _nonfinite_flag(grad_sq_sums)
            if found_inf is not None:
                if self._skipped_on_device is None:
                    self._skipped_on_device = torch.zeros((), dtype=torch.int64, device=found_inf.device)
                self._skipped_on_device += (found_inf != 0).long()
        if found_inf is None and not self._gradients_finite(plans, grad_sq_sums):
            self._skipped_on_host += 1
            return loss

        for group, plan, (params, grads), execution, (group_grad_sq_sums, _) in zip(
            self.param_groups, plans, views, executions, grad_sq_sums
        ):
            layout = plan.layout
            step_device = params[0].device if execution == "gpu" else torch.device("cpu")
            exp_avgs, exp_avg_sqs, state_steps = self._state_of(plan, step_device)
            fused = execution is not None
            # Where a mean of v needs ranks to add up, every execution takes it from its
            # recurrence, with the step's one all-reduce of the gradients' sums (above).
            exp_avg_sq_means = self._exp_avg_sq_means(plan, exp_avg_sqs, fused or not layout.exact_local)
            beta1, beta2 = group["betas"]
            softadam(
                params,
                grads,
                layout.views(exp_avgs),
                layout.views(exp_avg_sqs),
                [state_steps[k] for k, _, _ in layout.entries],
                exp_avg_sq_means=exp_avg_sq_means,
                grad_sq_sums=group_grad_sq_sums,
                numels=layout.whole_numels,
                found_inf=found_inf if execution == "gpu" else None,
                foreach=False if fused else group["foreach"],
                fused=fused,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                eta=group["eta"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if exp_avg_sq_means is not None:
                self._note_means_current(plan)
        return loss

    def _gradients_finite(self, plans: list[_StepPlan], grad_sq_sums: list[tuple[Tensor, list[Tensor]]]) -> bool:
        """True when every sum of squared gradients is finite. Otherwise False, to skip the
        step, when every group with a non-finite gradient has `nonfinite="skip"`; and a
        ValueError naming the first such parameter when one has `nonfinite="raise"`."""
        # Meta tensors (shapes without values, for tracing and initialisation) have nothing to check.
        flags = [
            torch.isfinite(sums).all()
            for sums, vectors in grad_sq_sums
            for sums in (sums, *vectors)
            if sums.device.type != "meta"
        ]
        # One value read back per device (on a GPU, the step's one synchronisation).
        by_device: dict[torch.device, list[Tensor]] = {}
        for flag in flags:
            by_device.setdefault(flag.device, []).append(flag)
        if all(bool(torch.stack(same).all()) for same in by_device.values()):
            return True
        first = None
        for group, plan, (sums, vectors) in zip(self.param_groups, plans, grad_sq_sums):
            bad = plan.layout.name_of_first_nonfinite(sums, vectors)
            if bad is not None and group["nonfinite"] == "raise":
                first = bad
                break
        if first is None:
            return False
        name, shape = first
        raise ValueError(
            f"SoftAdam: the gradient of parameter {name} (shape {shape}) is not finite "
            "(NaN or inf, or so large that its square overflows); no parameter or optimizer state was "
            "changed. With a loss scaler or overflow handling of your own, pass nonfinite='skip' to "
            "skip such steps instead."
        )


def _nonfinite_flag(grad_sq_sums: list[tuple[Tensor, list[Tensor]]]) -> Optional[Tensor]:
    """A float32 0-dim device tensor, 1 where any sum of squared gradients is not finite
    (GradScaler's `found_inf`), computed without reading it back; None where the sums
    lie on more than one device (the host then decides)."""
    sums = [t for whole, vectors in grad_sq_sums for t in (whole, *vectors) if t.numel()]
    if not sums or len({t.device for t in sums}) != 1:
        return None
    return (~torch.isfinite(torch.cat(sums))).any().float()


class _StepPlan(NamedTuple):
    """One parameter group's step: the tensors with a gradient, and where their pieces lie."""

    index: int  # the group's position when it was added
    params: list[Tensor]
    grads: list[Tensor]
    layout: GroupLayout


def _check_hyperparameters(
    *, lr: Union[float, Tensor], betas: Any, eps: float, eta: float, weight_decay: float
) -> None:
    """Raise ValueError("Invalid NAME=VALUE: ...") for the first unusable hyperparameter."""
    if isinstance(lr, Tensor):
        # As torch's optimizers take it: one element, read at every step (so that an lr
        # scheduler or a compiled step may change it in place).
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr={lr}: a Tensor lr must have exactly one element, it has {lr.numel()}")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Invalid lr={lr}: a Tensor lr must be a real floating-point tensor")
        if lr.device.type == "meta":
            return  # no value to check
    if not 0.0 <= lr:
        raise ValueError(f"Invalid lr={lr}: the learning rate must be >= 0")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid eps={eps}: must be >= 0")
    if not 0.0 <= eta:
        raise ValueError(
            f"Invalid eta={eta}: must be >= 0 (a negative eta can make the denominator "
            "1 + eta - eta*gamma + eta*gamma*sqrt(v/vbar) zero or negative)"
        )
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay={weight_decay}: must be >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas={betas!r}: must be a pair (beta1, beta2)")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{index}]={beta}: must be in [0, 1)")


def _check_nonfinite(nonfinite: Any) -> None:
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"Invalid nonfinite={nonfinite!r}: must be 'raise' or 'skip'")


def _check_one_device(params: list[Tensor], index: int) -> None:
    """Raise ValueError unless every tensor of param group `index` is on one device.

    A group's means of v and its sums of squared gradients are reduced in one vector on
    one device, so a group cannot span devices; groups may each have their own."""
    devices = sorted({str(local(p).device) for p in params})
    if len(devices) > 1:
        raise ValueError(
            f"SoftAdam: param group {index} holds parameters on more than one device ({', '.join(devices)}); "
            "put the parameters of each device in a param group of their own"
        )


def _kernel_can_update(tensor: Tensor) -> bool:
    """Whether the fused CPU kernel can read and update `tensor` in place: a plain
    contiguous CPU tensor (the local pieces of sharded parameters are, layout.py)."""
    return type(tensor) in _PLAIN_TYPES and tensor.is_cpu and tensor.is_contiguous()


def _sums(tensors: list[Tensor], square: bool = False, kernel_checked: bool = False) -> Tensor:
    r"""`sum(t)` (`sum(t^2)` with `square`) of each local tensor, as a float64 vector on
    their device.

    With `square`, over the gradients: the finiteness check of every step, and the
    recurrence of $\bar v$. Without, over `v` (which is never negative), to rebuild
    $\bar v$ from it: accumulated in float64, so that a rebuilt mean is the float64 mean of
    the float32 `v` (rebuilds are rare: after a load or a change of execution). Sums over
    whole tensors come from these through `GroupLayout.whole_sums`. `kernel_checked`: the
    fused CPU execution was chosen for these gradients, so they were already found fit
    for its kernel.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if square and (
        kernel_checked
        or (
            not torch.compiler.is_compiling()
            and all(_kernel_can_update(t) for t in tensors)
            and fused_cpu_kernel() is not None
        )
    ):
        return fused_cpu_kernel().grad_sq_sums(tensors)
    # Gradients: float32 accumulation (float64 for float64 tensors), whatever their dtype.
    dtype = torch.float64 if not square or any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(tensors, 2 if square else 1, dtype=dtype)
    sums = torch.stack([n.to(tensors[0].device) for n in norms]).double()
    return sums.square() if square else sums


Scalar = Union[float, Tensor]


def _step_coefficients(step: Scalar, beta2: float, eta: float) -> tuple[Scalar, Scalar, Scalar, Scalar]:
    r"""The scalar part of one SoftAdam step, shared by every execution.

    Returns `(beta2_t, 1 - beta2_t, 1 + eta - eta*gamma, eta*gamma)`. In eager mode
    `step` is a Python number and so are the results; under `torch.compile` it
    is the 0-dim step tensor, and the results are tensors, so the compiled graph does
    not specialise (and recompile) on the step count.

    `1 - beta2_t = max(1 - beta2, 1/t)` is computed directly rather than as
    `1 - min(beta2, 1 - 1/t)` to avoid a cancellation.
    """
    if isinstance(step, Tensor):
        second_moment_weight = (1.0 / step).clamp(min=1.0 - beta2)
        gamma = ((1.0 - beta2) / second_moment_weight).sqrt()
    else:
        second_moment_weight = max(1.0 - beta2, 1.0 / step)
        gamma = math.sqrt((1.0 - beta2) / second_moment_weight)
    return 1.0 - second_moment_weight, second_moment_weight, 1.0 + eta - eta * gamma, eta * gamma


def _eps_squared(eps: float, dtype: torch.dtype) -> float:
    # With eps=0, a tensor whose gradients are all zero has vbar=0 and sqrt(v)=0:
    # flooring at the smallest normal number keeps 0/sqrt(tiny) = 0 instead of NaN,
    # and changes nothing for any eps whose square is representable.
    return max(eps * eps, torch.finfo(dtype).tiny)


def softadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    exp_avg_sq_means: Optional[list[Tensor]] = None,
    grad_sq_sums: Optional[Tensor] = None,
    numels: Optional[list[int]] = None,
    found_inf: Optional[Tensor] = None,
    foreach: Optional[bool] = None,
    fused: Optional[bool] = None,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    eta: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    r"""Functional SoftAdam: apply one step to `params` in place.

    See `SoftAdam` for the algorithm. `exp_avgs` and `exp_avg_sqs` are in
    the state dtype of each parameter (float32 for bfloat16/float16 parameters);
    `state_steps` are 0-dim tensors, advanced here once each (entries that are pieces of
    one tensor share its counter).

    The entries may be pieces of larger original tensors (`SoftAdam` passes the local
    pieces of sharded and flattened parameters, `layout.py`). $\bar v$ is then the
    mean over the whole original tensor, which this function cannot see: pass
    `exp_avg_sq_means` (float64 0-dim tensors holding each whole tensor's
    $\bar v_{t-1}$, zero before the first step), `grad_sq_sums` (float64 vector of
    each whole tensor's $\sum g_t^2$) and `numels` (each whole tensor's number of
    elements); $\bar v_t = \beta_{2,t} \bar v_{t-1} + (1 - \beta_{2,t})
    \sum g_t^2 / n$ is computed from them and written back into `exp_avg_sq_means`, by
    every execution. Without `exp_avg_sq_means` each entry is a whole tensor and the
    per-tensor and foreach executions take $\bar v_t = \operatorname{mean}(v_t)$
    directly; `grad_sq_sums` and `numels` default to the entries' own.

    `fused=True` runs the fused CPU kernel, or for CUDA parameters the fused GPU
    kernels, and needs `exp_avg_sq_means`. The GPU kernels read `state_steps` on the
    parameters' device and advance them there, and with `found_inf` (a device tensor,
    non-zero where the step is refused, as `torch.amp.GradScaler` keeps it) they change
    nothing, the step counters included, without a synchronisation. `fused=None` means
    False in this functional form; `SoftAdam` picks.

    `lr` may be a one-element tensor. In eager mode its value is read once per call (for
    an lr on an accelerator, one device synchronisation); under `torch.compile` it enters
    the graph as a tensor, so changing it does not recompile.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a Tensor lr must have exactly one element, got {lr.numel()}")
        lr = _to_scalar(lr) if torch.compiler.is_compiling() else lr.item()
    if fused:
        if foreach:
            raise ValueError("fused=True and foreach=True cannot both be set: pick one execution")
        if exp_avg_sq_means is None:
            raise ValueError("the fused execution needs exp_avg_sq_means (mean(v) per parameter, float64)")
        device = params[0].device if params else torch.device("cpu")
        on_gpu = device.type == "cuda" or (_TRITON_ON_CPU and device.type == "cpu")
        if found_inf is not None and not on_gpu:
            raise ValueError("found_inf is taken by the fused GPU execution only (fused=True, CUDA parameters)")
        # Both fused executions advance the counters and the means of v themselves.
        execution = partial(_fused_gpu_softadam, found_inf=found_inf) if on_gpu else _fused_softadam
        execution(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            exp_avg_sq_means,
            grad_sq_sums,
            numels,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            eta=eta,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        return
    if found_inf is not None:
        raise ValueError("found_inf is taken by the fused GPU execution only (fused=True, CUDA parameters)")
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    func = _multi_tensor_softadam if foreach else _single_tensor_softadam
    if not params:
        return
    if torch.compiler.is_compiling():
        torch._foreach_add_(state_steps, 1)  # plain tensors only under compile: no shared counters
    else:
        torch._foreach_add_(list({id(s): s for s in state_steps}.values()), 1)
    if exp_avg_sq_means is not None:
        if grad_sq_sums is None:
            grad_sq_sums = _sums(grads, square=True)
        _advance_means(exp_avg_sq_means, grad_sq_sums, numels or [p.numel() for p in params], state_steps, beta2)
    func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        exp_avg_sq_means,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        eta=eta,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )


def _advance_means(
    means: list[Tensor], grad_sq_sums: Tensor, numels: list[int], state_steps: list[Tensor], beta2: float
) -> None:
    r"""$\bar v_t = \beta_{2,t} \bar v_{t-1} + (1 - \beta_{2,t}) \sum g_t^2 / n$, in float64,
    in place: the mean of v follows the same recurrence as v, so it needs no pass over v."""
    weights = [c[1] for c in _coefficients_per_step([_get_value(s) for s in state_steps], beta2, 0.0)]
    old = torch.stack(means).to(dtype=torch.float64)
    torch._foreach_copy_(means, list(_next_means(old, grad_sq_sums, numels, weights).unbind()))


def _next_means(old: Tensor, grad_sq_sums: Tensor, numels: list[int], weights: list[Scalar]) -> Tensor:
    """The recurrence of `_advance_means` on float64 vectors: `old` holds
    $\bar v_{t-1}$ per entry, `weights` each entry's $1 - \beta_{2,t}$."""
    device = old.device
    weights = torch.tensor(weights, dtype=torch.float64)
    sizes = torch.tensor([max(n, 1) for n in numels], dtype=torch.float64)
    return (1.0 - weights).to(device) * old + weights.to(device) * (grad_sq_sums.to(device) / sizes.to(device))


def _single_tensor_softadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_sq_means: Optional[list[Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eta: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    for i, (param, grad, exp_avg, exp_avg_sq, step_t) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, state_steps)
    ):
        beta2_t, second_moment_weight, denom_offset, denom_scale = _step_coefficients(_get_value(step_t), beta2, eta)
        # Low-precision parameters: do the arithmetic on a float32 copy.
        work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
        grad = grad.to(exp_avg.dtype)
        if maximize:
            grad = -grad

        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2_t)
        if isinstance(second_moment_weight, Tensor):  # torch.compile: tensor coefficient
            exp_avg_sq.add_(grad.square() * second_moment_weight)
        else:
            exp_avg_sq.addcmul_(grad, grad, value=second_moment_weight)

        if weight_decay != 0:
            work.mul_(1 - lr * weight_decay)
        numerator = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1) if nesterov else exp_avg
        if eta == 0:
            # d == 1 exactly: plain SGD with momentum, bit for bit.
            if isinstance(lr, Tensor):  # torch.compile with a tensor lr
                work.sub_(numerator * lr)
            else:
                work.add_(numerator, alpha=-lr)
        else:
            mean = exp_avg_sq.mean() if exp_avg_sq_means is None else exp_avg_sq_means[i]
            inv_rms = torch.rsqrt(mean + _eps_squared(eps, exp_avg_sq.dtype)).to(exp_avg_sq.dtype)
            denom = exp_avg_sq.sqrt().mul_(denom_scale * inv_rms).add_(denom_offset)
            if isinstance(lr, Tensor):
                work.sub_(numerator / denom * (lr * (1 + eta)))
            else:
                work.addcdiv_(numerator, denom, value=-lr * (1 + eta))
        if work is not param:
            param.copy_(work)


def _multi_tensor_softadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_sq_means: Optional[list[Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eta: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    if len(params) == 0:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, state_steps],
        with_indices=True,  # type: ignore[list-item]
    )
    for (
        device_params_,
        device_grads_,
        device_exp_avgs_,
        device_exp_avg_sqs_,
        device_steps_,
    ), indices in grouped.values():
        device_params: list[Tensor] = list(device_params_)  # type: ignore[arg-type]
        device_exp_avgs: list[Tensor] = list(device_exp_avgs_)  # type: ignore[arg-type]
        device_exp_avg_sqs: list[Tensor] = list(device_exp_avg_sqs_)  # type: ignore[arg-type]
        device_steps: list[Tensor] = list(device_steps_)  # type: ignore[arg-type]
        state_dtype = device_exp_avgs[0].dtype
        # Low-precision parameters: do the arithmetic on float32 copies.
        work = device_params if device_params[0].dtype == state_dtype else [p.to(state_dtype) for p in device_params]
        device_grads = [g.to(state_dtype) for g in device_grads_]  # type: ignore[union-attr]
        if maximize:
            device_grads = torch._foreach_neg(device_grads)

        steps = [_get_value(s) for s in device_steps]
        if not isinstance(steps[0], Tensor) and all(s == steps[0] for s in steps):
            # The usual eager case: one scalar per coefficient, which keeps the
            # foreach kernels on their in-place scalar fast path.
            beta2_t, weight, denom_offset, denom_scale = _step_coefficients(steps[0], beta2, eta)
        else:
            # Per-tensor coefficients: 0-dim tensors under torch.compile, or Python
            # numbers when parameters that joined the group later have their own steps.
            coefficients = [_step_coefficients(s, beta2, eta) for s in steps]
            beta2_t, weight, denom_offset, denom_scale = (list(c) for c in zip(*coefficients))

        torch._foreach_mul_(device_exp_avgs, beta1)
        torch._foreach_add_(device_exp_avgs, device_grads, alpha=1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2_t)
        if isinstance(steps[0], Tensor):
            squares = torch._foreach_mul(device_grads, device_grads)
            torch._foreach_mul_(squares, weight)
            torch._foreach_add_(device_exp_avg_sqs, squares)
            del squares
        else:
            torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, weight)

        if weight_decay != 0:
            torch._foreach_mul_(work, 1 - lr * weight_decay)
        if nesterov:
            numerators = torch._foreach_mul(device_exp_avgs, beta1)
            torch._foreach_add_(numerators, device_grads, alpha=1 - beta1)
        else:
            numerators = device_exp_avgs
        if eta == 0:
            # d == 1 exactly: plain SGD with momentum, bit for bit.
            if isinstance(lr, Tensor):  # torch.compile with a tensor lr
                torch._foreach_sub_(work, torch._foreach_mul(numerators, lr))
            else:
                torch._foreach_add_(work, numerators, alpha=-lr)
        else:
            if exp_avg_sq_means is None:
                # Per-tensor mean of v: v >= 0, so its L1 norm is its sum.
                sums = torch._foreach_norm(device_exp_avg_sqs, 1)
                means = torch._foreach_div(sums, [float(v.numel()) for v in device_exp_avg_sqs])
            else:
                means = [exp_avg_sq_means[i].to(state_dtype) for i in indices]
            inv_rms = torch._foreach_rsqrt(torch._foreach_add(means, _eps_squared(eps, state_dtype)))
            inv_rms = torch._foreach_mul(inv_rms, denom_scale)
            denoms = torch._foreach_sqrt(device_exp_avg_sqs)
            torch._foreach_mul_(denoms, inv_rms)
            torch._foreach_add_(denoms, denom_offset)
            if isinstance(lr, Tensor):
                updates = torch._foreach_div(numerators, denoms)
                torch._foreach_mul_(updates, lr * (1 + eta))
                torch._foreach_sub_(work, updates)
            else:
                torch._foreach_addcdiv_(work, numerators, denoms, -lr * (1 + eta))
        if work is not device_params:
            torch._foreach_copy_(device_params, work)


def _coefficients_per_step(steps: list[Scalar], beta2: float, eta: float) -> list[tuple[Scalar, ...]]:
    """`_step_coefficients` of each step count, computed once per distinct count
    (usually one: every tensor of a group on the same step)."""
    if steps and not isinstance(steps[0], Tensor):
        table = {step: _step_coefficients(step, beta2, eta) for step in set(steps)}
        return [table[step] for step in steps]
    return [_step_coefficients(step, beta2, eta) for step in steps]


def _fused_softadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_sq_means: list[Tensor],
    grad_sq_sums: Optional[Tensor],
    numels: Optional[list[int]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eta: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The fused CPU execution (`csrc/fused_softadam_cpu.cpp`). The counters and the
    means of v are read and written by the kernel module rather than by a torch op per
    tensor (hundreds per step); the scalar algorithm is the one of the other executions
    (`_step_coefficients`, `_next_means`)."""
    if not params:
        return
    kernel = fused_cpu_kernel()
    if kernel is None:
        raise RuntimeError(f"fused=True, but SoftAdam's fused CPU kernel {fused_cpu_unavailable_reason()}")
    steps = kernel.increment_steps(state_steps)
    coefficients = _coefficients_per_step(steps, beta2, eta)
    beta2_t, weight, denom_offset, denom_scale = ([c[i] for c in coefficients] for i in range(4))
    if grad_sq_sums is None:
        grad_sq_sums = _sums(grads, square=True)
    old = torch.tensor(kernel.read_scalars(exp_avg_sq_means), dtype=torch.float64)
    means = _next_means(old, grad_sq_sums, numels or [p.numel() for p in params], weight).tolist()
    kernel.write_scalars(exp_avg_sq_means, means)
    kernel.fused_softadam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        means if eta != 0 else [0.0] * len(params),
        beta2_t,
        weight,
        denom_offset,
        denom_scale,
        lr,
        beta1,
        eps * eps,
        eta,
        weight_decay,
        nesterov,
        maximize,  # eps^2 floored per dtype there
    )


def _fused_gpu_softadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_sq_means: list[Tensor],
    grad_sq_sums: Optional[Tensor],
    numels: Optional[list[int]],
    *,
    found_inf: Optional[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eta: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The fused GPU execution (`_triton.py`): the step counters and the means of v
    advance on the device, in the kernels, so nothing is read back."""
    if not params:
        return
    from softadam_nlp._triton import triton_step_, triton_unavailable_reason

    device = params[0].device
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"fused=True, but SoftAdam's fused GPU execution {reason}")
    for name, tensors in (("state_steps", state_steps), ("exp_avg_sq_means", exp_avg_sq_means)):
        if any(t.device != device for t in tensors):
            raise ValueError(f"the fused GPU execution reads {name} on the parameters' device ({device})")
    # Grouped by parameter dtype: each dtype is one launch of each kernel.
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    sums = grad_sq_sums if grad_sq_sums is not None else _sums(grads, square=True)
    sizes = numels or [p.numel() for p in params]
    for indices in by_dtype.values():
        whole = len(indices) == len(params)

        def pick(tensors: list, indices: list[int] = indices, whole: bool = whole) -> list:
            return tensors if whole else [tensors[i] for i in indices]

        triton_step_(
            pick(params),
            pick(grads),
            pick(exp_avgs),
            pick(exp_avg_sqs),
            pick(state_steps),
            pick(exp_avg_sq_means),
            sums if whole else sums[torch.tensor(indices, device=sums.device)],
            pick(sizes),
            found_inf,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            eta=eta,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
