r"""SoftAdam's fused GPU execution: two multi-tensor Triton kernels per step.

The step of a parameter group runs, after `SoftAdam.step` has read every gradient
once for its sum of squares (the finiteness decision and the means):

1. `_advance_kernel`, one program per `ADVANCE_BLOCK` entries: from each entry's
   step counter (a 0-dim float32 tensor on the device) the step coefficients
   $\beta_{2,t}$, $1 - \beta_{2,t}$, $1 + \eta - \eta\gamma_t$ and
   $\eta\gamma_t / \sqrt{\bar v_t + \epsilon^2}$, in float64 as
   `softadam._step_coefficients` computes them on the host, and the mean of v by its
   recurrence $\bar v_t = \beta_{2,t} \bar v_{t-1} + (1 - \beta_{2,t}) \sum g_t^2 / n$
   (`softadam._advance_means`), written back into the entry's float64
   `exp_avg_sq_mean`;
2. `_update_kernel`, one program per `UPDATE_BLOCK` elements of one entry: m, v and
   the parameter together, in one pass, in the arithmetic of the fused CPU kernel
   (`csrc/fused_softadam_cpu.cpp`): float32 for float32, bfloat16 and float16
   parameters, divisions and square roots correctly rounded.

Tensors reach the kernels through tables of their addresses (one int64 per tensor and
role), so one launch covers every tensor of a group whatever their number, and nothing
is compiled again when the parameter list changes: the kernels are specialised only on
the parameters' dtype and the step's branches (nesterov, eta = 0, a found_inf flag).
The tables are rebuilt only when an address changes, and copied to the device from
pinned memory without a synchronisation.

With a `found_inf` flag (a device tensor, non-zero when a gradient is not finite, as
`torch.amp.GradScaler` keeps it) nothing is written where it is set: not the means,
not the moments, not the parameters, and the step counters do not advance. No value
goes back to the host, so `nonfinite="skip"` costs no synchronisation.

With `TRITON_INTERPRET=1` set before this module is imported, Triton's interpreter
runs the same kernels on CPU tensors: that is how the suite tests them on machines
without a GPU (`tests/test_triton.py`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CUDA builds of torch ship triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["TRITON_DTYPES", "triton_step_", "triton_unavailable_reason"]

# Parameter (and gradient) dtypes the kernels handle; the state is float32 for all three.
# float64 parameters keep to the other executions (float32 scalars would round them).
TRITON_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Elements per program of the update kernel, and entries per program of the advance
# kernel. The interpreter runs programs one after another, so fewer, larger ones are faster there.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
UPDATE_BLOCK = 4096 if INTERPRETED else 1024
ADVANCE_BLOCK = 128


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton execution cannot run on `device`, or None when it can."""
    if triton is None:
        return "needs triton, which is not installed"
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return None
    return f"runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1), not on {device.type}"


if triton is not None:

    @triton.jit
    def _pointer(address, KIND: tl.constexpr):
        """An int64 address as a pointer to the parameter dtype KIND (TRITON_DTYPES)."""
        if KIND == 0:
            return address.to(tl.pointer_type(tl.float32))
        elif KIND == 1:
            return address.to(tl.pointer_type(tl.bfloat16))
        else:
            return address.to(tl.pointer_type(tl.float16))

    @triton.jit
    def _to_bfloat16(x):
        """float32 to bfloat16, rounded to nearest even, written out in integer operations:
        the GPU's conversion rounds so too, and Triton's interpreter (numpy has no
        bfloat16) would truncate, which over many small steps drifts towards zero."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    # count and the sizes vary with the parameter list: not specialised on, so a new list
    # compiles nothing.
    @triton.jit(do_not_specialize=["count"])
    def _advance_kernel(
        step_addresses,
        mean_addresses,
        grad_sq_sums,
        numels,
        hyper,
        found_inf,
        coefficients,
        count,
        HAS_FOUND_INF: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # hyper (float64): 1 - beta2, eta, eps^2 floored (softadam._eps_squared).
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < count
        one_minus_beta2 = tl.load(hyper)
        eta = tl.load(hyper + 1)
        eps_squared = tl.load(hyper + 2)
        step_pointers = tl.load(step_addresses + offsets, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(step_pointers, mask=mask, other=0.0).to(tl.float64) + 1.0
        # softadam._step_coefficients: 1 - beta2_t = max(1 - beta2, 1/t), without cancellation.
        weight = tl.maximum(one_minus_beta2, 1.0 / step)
        gamma = tl.sqrt(one_minus_beta2 / weight)  # float64: correctly rounded
        mean_pointers = tl.load(mean_addresses + offsets, mask=mask, other=0).to(tl.pointer_type(tl.float64))
        old_mean = tl.load(mean_pointers, mask=mask, other=0.0)
        new_mean = (1.0 - weight) * old_mean + weight * (
            tl.load(grad_sq_sums + offsets, mask=mask, other=0.0)
            / tl.maximum(tl.load(numels + offsets, mask=mask, other=1), 1).to(tl.float64)
        )
        if HAS_FOUND_INF:
            new_mean = tl.where(tl.load(found_inf) != 0, old_mean, new_mean)
        tl.store(mean_pointers, new_mean, mask=mask)
        row = coefficients + offsets * 4
        tl.store(row, 1.0 - weight, mask=mask)
        tl.store(row + 1, weight, mask=mask)
        tl.store(row + 2, 1.0 + eta - eta * gamma, mask=mask)
        tl.store(row + 3, eta * gamma / tl.sqrt(new_mean + eps_squared), mask=mask)

    @triton.jit
    def _update_kernel(
        param_addresses,
        grad_addresses,
        exp_avg_addresses,
        exp_avg_sq_addresses,
        numels,
        chunk_entries,
        chunk_starts,
        coefficients,
        found_inf,
        beta1,
        one_minus_beta1,
        grad_sign,
        decay,
        step_size,
        KIND: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr,
        NESTEROV: tl.constexpr,
        USE_DENOM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        entry = tl.load(chunk_entries + chunk)
        offsets = tl.load(chunk_starts + chunk) + tl.arange(0, BLOCK)
        size = tl.load(numels + entry)
        if HAS_FOUND_INF:
            size = tl.where(tl.load(found_inf) == 0, size, 0)  # a refused step reads and writes nothing
        mask = offsets < size
        param = _pointer(tl.load(param_addresses + entry), KIND)
        grad = _pointer(tl.load(grad_addresses + entry), KIND)
        exp_avg = tl.load(exp_avg_addresses + entry).to(tl.pointer_type(tl.float32))
        exp_avg_sq = tl.load(exp_avg_sq_addresses + entry).to(tl.pointer_type(tl.float32))
        beta2_t = tl.load(coefficients + entry * 4).to(tl.float32)
        weight = tl.load(coefficients + entry * 4 + 1).to(tl.float32)

        g = tl.load(grad + offsets, mask=mask, other=0.0).to(tl.float32) * grad_sign
        m = tl.load(exp_avg + offsets, mask=mask, other=0.0) * beta1 + g * one_minus_beta1
        v = tl.load(exp_avg_sq + offsets, mask=mask, other=0.0) * beta2_t + g * g * weight
        tl.store(exp_avg + offsets, m, mask=mask)
        tl.store(exp_avg_sq + offsets, v, mask=mask)
        if NESTEROV:
            numerator = m * beta1 + g * one_minus_beta1
        else:
            numerator = m
        p = tl.load(param + offsets, mask=mask, other=0.0).to(tl.float32) * decay
        if USE_DENOM:
            denom_offset = tl.load(coefficients + entry * 4 + 2).to(tl.float32)
            scale = tl.load(coefficients + entry * 4 + 3).to(tl.float32)
            p = p + step_size * tl.div_rn(numerator, tl.sqrt_rn(v) * scale + denom_offset)
        else:  # eta = 0: d = 1 exactly, SGD with momentum
            p = p + step_size * numerator
        if KIND == 1:
            tl.store(param + offsets, _to_bfloat16(p), mask=mask)
        else:
            tl.store(param + offsets, p.to(param.dtype.element_ty), mask=mask)


class _Tables:
    """A group's device tables: tensor addresses per role, sizes, and the chunk map of
    the update kernel. Kept while the addresses stay the same (the usual case: the
    caching allocator hands a gradient the same memory step after step)."""

    def __init__(self, key: tuple, numels: list[int], whole_numels: list[int], device: torch.device) -> None:
        count = len(numels)
        addresses = torch.tensor(key[: 6 * count], dtype=torch.int64).view(6, count)
        sizes = torch.tensor(numels, dtype=torch.int64)
        chunks = (sizes + UPDATE_BLOCK - 1) // UPDATE_BLOCK
        entries = torch.repeat_interleave(torch.arange(count, dtype=torch.int64), chunks)
        first_chunk = torch.cumsum(chunks, 0) - chunks
        starts = (torch.arange(len(entries), dtype=torch.int64) - first_chunk[entries]) * UPDATE_BLOCK
        self.chunks = len(entries)
        host = torch.cat([addresses.flatten(), sizes, torch.tensor(whole_numels, dtype=torch.int64), entries, starts])
        if device.type == "cuda":
            host = host.pin_memory()
        table = host.to(device, non_blocking=True)
        (
            self.params,
            self.grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            self.steps,
            self.means,
            self.numels,
            self.whole_numels,
        ) = table[: 8 * count].view(8, count).unbind()
        self.entries = table[8 * count : 8 * count + self.chunks]
        self.starts = table[8 * count + self.chunks :]
        self.coefficients = torch.empty(4 * count, dtype=torch.float64, device=device)


_TABLES: dict[tuple, _Tables] = {}
_HYPER: dict[tuple, Tensor] = {}


def _device_constants(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small float64 tensor of `values` on `device`, made once per distinct values."""
    key = (values, device)
    table = _HYPER.get(key)
    if table is None:
        host = torch.tensor(values, dtype=torch.float64)
        table = _HYPER[key] = host.to(device)
    return table


def triton_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    exp_avg_sq_means: list[Tensor],
    grad_sq_sums: Tensor,
    numels: list[int],
    found_inf: Optional[Tensor],
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
    """One SoftAdam step of a group's entries on one device, in place (see the module doc).

    `state_steps`: per entry, its tensor's 0-dim float32 step counter on the device,
    before this step (entries that are pieces of one tensor share it); advanced here,
    unless `found_inf` is set. `exp_avg_sq_means`: per entry, a float64 0-dim tensor
    (or a view of one element) holding $\bar v_{t-1}$ of its whole original tensor.
    `grad_sq_sums`: float64, per entry, $\\sum g_t^2$ over its whole original tensor;
    `numels`: each whole tensor's number of elements.
    """
    if not params:
        return
    device = params[0].device
    kind = TRITON_DTYPES[params[0].dtype]
    local_numels = [p.numel() for p in params]
    key = (
        *(t.data_ptr() for t in params),
        *(t.data_ptr() for t in grads),
        *(t.data_ptr() for t in exp_avgs),
        *(t.data_ptr() for t in exp_avg_sqs),
        *(t.data_ptr() for t in state_steps),
        *(t.data_ptr() for t in exp_avg_sq_means),
        *local_numels,
        *numels,
        kind,
        str(device),
    )
    tables = _TABLES.get(key)
    if tables is None:
        if len(_TABLES) > 64:  # tables of parameter lists no longer stepped
            _TABLES.clear()
        tables = _TABLES[key] = _Tables(key, local_numels, numels, device)
    count = len(params)
    eps_squared = max(eps * eps, torch.finfo(torch.float32).tiny)
    hyper = _device_constants((1.0 - beta2, eta, eps_squared), device)
    flag = found_inf if found_inf is not None else hyper  # an unread placeholder without a flag
    _advance_kernel[(triton.cdiv(count, ADVANCE_BLOCK),)](
        tables.steps,
        tables.means,
        grad_sq_sums.to(device=device, dtype=torch.float64),
        tables.whole_numels,
        hyper,
        flag,
        tables.coefficients,
        count,
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=ADVANCE_BLOCK,
    )
    if tables.chunks:
        _update_kernel[(tables.chunks,)](
            tables.params,
            tables.grads,
            tables.exp_avgs,
            tables.exp_avg_sqs,
            tables.numels,
            tables.entries,
            tables.starts,
            tables.coefficients,
            flag,
            beta1,
            1.0 - beta1,
            -1.0 if maximize else 1.0,
            1.0 - lr * weight_decay,
            -lr * (1.0 + eta),
            KIND=kind,
            HAS_FOUND_INF=found_inf is not None,
            NESTEROV=nesterov,
            USE_DENOM=eta != 0,
            BLOCK=UPDATE_BLOCK,
        )
    steps = list({id(s): s for s in state_steps}.values())
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, [1.0 - (found_inf != 0).float()] * len(steps))
