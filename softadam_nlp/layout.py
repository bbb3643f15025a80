r"""Which original tensor each local piece of a stepped tensor belongs to, and over which
process groups its sums are reduced.

SoftAdam's $\bar v$ is a mean over a whole ORIGINAL parameter tensor. The engines
that shard or flatten parameters hand the optimizer something else:

================================  ==============================================  =====================
engine                            what the optimizer steps                        how it is mapped
================================  ==============================================  =====================
one process, DDP                  the original tensors                            as they are
FSDP2 (`fully_shard`)           DTensors: local shards of the original tensors  mesh dims sharded on
FSDP1, `use_orig_params=False`  one `FlatParameter` per wrapped unit: the     `_shard_param_infos`
                                  rank's shard of all its tensors, concatenated,
                                  plus padding
FSDP1, `use_orig_params=True`   1-D slices of the rank's shard, one per         the unit's handle
                                  original tensor (empty where it holds none)
DeepSpeed ZeRO-1/2                one flat fp32 partition per param group,        `_hp_mapping` of the
                                  tensors SoftAdam was never built with           tensors it was built with
================================  ==============================================  =====================

`tensor_layout` describes one stepped tensor as a `TensorLayout`: the
original tensors it holds pieces of (their names and sizes), where each piece lies in
the local tensor (padding lies in none), and the process groups over which a sum over
its pieces must be all-reduced to become a sum over the whole original tensor.
`GroupLayout` does that for a parameter group: it turns per-parameter tensors
into per-piece views, and per-piece local sums into whole-tensor sums with one
all-reduce per set of process groups for all tensors of the group. Every rank builds the
same reduction vectors (one slot per original tensor of every parameter of the group,
whether or not the rank holds a piece of it or a gradient for it this step), so ranks
that hold nothing of a tensor add 0.

What cannot be mapped back to whole tensors raises `UnsupportedLayoutError`, a
ValueError naming the engine and what to use instead. The update math lives in
`softadam.py`; this module only knows layouts.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

try:  # torch builds without distributed support have neither DTensor nor process groups
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["GroupLayout", "TensorLayout", "UnsupportedLayoutError", "local", "tensor_layout"]

# Where to go instead, for every refusal.
SUPPORTED = (
    "SoftAdam is exact in one process, under DDP, FSDP2 (fully_shard), FSDP1 "
    "(FullyShardedDataParallel, any sharding strategy and use_orig_params) and DeepSpeed ZeRO stages 0-2"
)


class UnsupportedLayoutError(ValueError):
    """SoftAdam was handed tensors that it cannot map back to whole original tensors."""


@dataclass(frozen=True)
class Piece:
    """A contiguous run of the flattened local tensor that belongs to one original tensor."""

    start: int  # first element, in the flattened local tensor
    numel: int
    slot: int  # which of the layout's original tensors


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor that SoftAdam steps relates to the original parameter tensors.

    `pieces` is None when the local tensor, as it is, is (a shard of) one original
    tensor: slot 0. `groups`: the sum of a piece is all-reduced over each of these
    process groups in turn to become the whole tensor's sum; empty when the local pieces
    are whole tensors.
    """

    engine: str
    names: tuple[str, ...]  # one per original tensor (slot), for messages
    shapes: tuple[tuple[int, ...], ...]  # one per slot: the original tensor's shape
    whole_numels: tuple[int, ...]  # one per slot: the original tensor's number of elements
    pieces: Optional[tuple[Piece, ...]] = None
    groups: tuple[Any, ...] = ()

    @property
    def slots(self) -> int:
        return len(self.whole_numels)


# The engine of DTensor layouts: the one whose stepped tensors are not their own local pieces.
DTENSOR_ENGINE = "FSDP2 (DTensor)"

# Exact types of plain tensors: layouts are looked up for every tensor of every step,
# so the common case must not pay for isinstance checks against DTensor.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def is_dtensor(tensor: Tensor) -> bool:
    return type(tensor) not in _PLAIN_TYPES and DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor itself, or a DTensor's local shard (sharing its memory)."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def tensor_layout(param: Tensor, name: str, built_with: Sequence[Tensor], built_names: Sequence[str]) -> TensorLayout:
    """The layout of `param`, a tensor of a parameter group that SoftAdam is about to step.

    `name` names it in messages; `built_with` are the tensors the group held when it
    was added to the optimizer, named by `built_names` (DeepSpeed ZeRO-1/2 replaces them
    with its flat partitions, which are mapped back through them). Raises
    `UnsupportedLayoutError` for what cannot be mapped back to whole tensors.
    """
    if is_dtensor(param):
        return _dtensor_layout(param, name)
    if getattr(param, "_is_flat_param", False):
        return _flat_param_layout(param, _fsdp1_handle(flat_param=param))
    if getattr(param, "_fsdp_flattened", False):
        return _fsdp1_view_layout(param, name)
    if type(param).__name__ == "FlatParameter":
        # fairscale's FSDP (and its FlattenParamsWrapper) build the optimizer over their own
        # FlatParameters, which carry none of the layout torch's FSDP1 records.
        raise UnsupportedLayoutError(
            f"SoftAdam was built with a FlatParameter of shape {tuple(param.shape)} from "
            f"{type(param).__module__} (fairscale's FSDP or a flattening wrapper): it concatenates "
            "whole parameter tensors, and SoftAdam's mean of v over each tensor would silently become a "
            f"mean over the flat buffer. {SUPPORTED}."
        )
    if any(p is param for p in built_with):
        return TensorLayout("plain", (name,), (tuple(param.shape),), (param.numel(),))
    return _partition_layout(param, built_with, built_names)


def _dtensor_layout(param: Tensor, name: str) -> TensorLayout:
    """FSDP2 (and any DTensor sharded or replicated over its mesh): the local shard is a
    piece of the one original tensor, summed over the mesh dimensions it is sharded on."""
    groups = []
    for dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise UnsupportedLayoutError(
                f"SoftAdam: parameter {name} is a DTensor with a Partial placement (unreduced); "
                "reduce it first, as FSDP2 and DDP do"
            )
        if placement.is_shard():
            groups.append(param.device_mesh.get_group(dim))
    return TensorLayout(DTENSOR_ENGINE, (name,), (tuple(param.shape),), (param.numel(),), None, tuple(groups))


def _flat_param_layout(flat_param: Tensor, handle: Any) -> TensorLayout:
    """FSDP1's FlatParameter: the rank's shard of several original tensors, concatenated."""
    pieces = tuple(
        Piece(info.offset_in_shard, info.numel_in_shard, slot)
        for slot, info in enumerate(flat_param._shard_param_infos)
        if info.in_shard and info.numel_in_shard > 0
    )
    groups = (handle.process_group,) if handle.uses_sharded_strategy else ()
    names = tuple(f"'{fqn}'" for fqn in flat_param._fqns)
    shapes = tuple(tuple(shape) for shape in flat_param._shapes)
    return TensorLayout("FSDP1 (FlatParameter)", names, shapes, tuple(flat_param._numels), pieces, groups)


def _fsdp1_view_layout(param: Tensor, name: str) -> TensorLayout:
    """FSDP1 with `use_orig_params=True`: the original parameter object, its data a 1-D
    slice of the rank's shard of its FlatParameter (empty where the rank holds none of it)."""
    handle = _fsdp1_handle(orig_param=param)
    flat_param = handle.flat_param
    index = next(i for i, p in enumerate(flat_param._params) if p is param)
    fqn, shape = f"'{flat_param._fqns[index]}'", tuple(flat_param._shapes[index])
    if not handle.uses_sharded_strategy:  # NO_SHARD: the original tensor as it is
        return TensorLayout("FSDP1 (NO_SHARD)", (fqn,), (shape,), (param.numel(),))
    return TensorLayout(
        "FSDP1 (use_orig_params=True)", (fqn,), (shape,), (flat_param._numels[index],), None, (handle.process_group,)
    )


def _fsdp1_handle(*, flat_param: Optional[Tensor] = None, orig_param: Optional[Tensor] = None) -> Any:
    """The FSDP1 handle (`FlatParamHandle`) that owns `flat_param` or `orig_param`.

    Neither a FlatParameter nor an original parameter refers back to the handle, which
    knows the process group and the sharding strategy. Only the FSDP1 modules do, so they
    are found among the live objects, once per tensor at its first step (a layout is
    cached); this keeps FSDP1 working without the user telling SoftAdam about the model.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    for obj in gc.get_objects():
        if not isinstance(obj, FullyShardedDataParallel) or obj._handle is None:
            continue
        handle = obj._handle
        if flat_param is not None and handle.flat_param is flat_param:
            return handle
        if orig_param is not None and any(p is orig_param for p in handle.flat_param._params or ()):
            return handle
    raise UnsupportedLayoutError(
        "SoftAdam was handed a parameter flattened by FSDP (it carries _fsdp_flattened) that belongs to no "
        "live FullyShardedDataParallel module, so it cannot be mapped back to its original tensor. "
        f"{SUPPORTED}; fairscale's and other flattening wrappers are not supported."
    )


def _partition_layout(param: Tensor, built_with: Sequence[Tensor], built_names: Sequence[str]) -> TensorLayout:
    """A tensor the group was not built with: DeepSpeed ZeRO-1/2's flat fp32 partition,
    mapped back through the `_hp_mapping` of the tensors it was built with; refused
    otherwise (ZeRO-3, another wrapper)."""
    if any(hasattr(p, "ds_id") for p in built_with):
        raise UnsupportedLayoutError(
            "SoftAdam cannot run under DeepSpeed ZeRO stage 3: it steps flat partitions of parameter "
            "sub-groups whose layout its optimizer does not expose, and SoftAdam's mean of v over each "
            f"whole parameter tensor would silently become a mean over a partition. {SUPPORTED}: use ZeRO "
            "stage 1 or 2 (zero_optimization.stage), or FSDP2 (fully_shard) to shard parameters too."
        )
    storage = param.untyped_storage().data_ptr()
    pieces, groups = [], set()
    for slot, built in enumerate(built_with):
        mapping = getattr(built, "_hp_mapping", None)
        fragment = getattr(mapping, "hp_fragment", None)
        if fragment is None or fragment.untyped_storage().data_ptr() != storage:
            continue
        address = mapping.get_hp_fragment_address()
        pieces.append(Piece(address.start, address.numel, slot))
        groups.add(built._dp_group)
    if not pieces and not any(hasattr(p, "_hp_mapping") for p in built_with):
        raise UnsupportedLayoutError(
            f"SoftAdam was handed a tensor of shape {tuple(param.shape)} that it was not built with and "
            "cannot map back to its original parameters: a wrapper (such as DeepSpeed's fp16 optimizer, or "
            "fairscale) replaced the optimizer's parameters with flattened copies, which would silently turn "
            f"the mean of v over each whole tensor into a mean over a flat buffer. {SUPPORTED}."
        )
    if len(groups) > 1:
        raise UnsupportedLayoutError("SoftAdam: the pieces of one DeepSpeed partition name different process groups")
    return TensorLayout(
        "DeepSpeed ZeRO-1/2",
        tuple(built_names),
        tuple(tuple(p.shape) for p in built_with),
        tuple(p.numel() for p in built_with),
        tuple(sorted(pieces, key=lambda piece: piece.start)),
        tuple(groups),
    )


class GroupLayout:
    """The layouts of one parameter group's tensors, for one step.

    Built over every tensor of the group (`layouts`) and the positions of those with a
    gradient this step (`stepped`): views and sums are per *entry*, one entry per piece
    of a stepped tensor (a whole local tensor is one entry).
    """

    def __init__(self, layouts: Sequence[TensorLayout], stepped: Sequence[int], device: torch.device) -> None:
        self.layouts = list(layouts)
        self.device = device  # of the reduction vectors: a rank with nothing to step still takes part
        self.stepped = list(stepped)
        self.exact_local = all(not layout.groups and layout.pieces is None for layout in self.layouts)
        # Entries: (position of the tensor among the stepped ones, piece or None, slot).
        self.entries: list[tuple[int, Optional[Piece], int]] = []
        for k, index in enumerate(self.stepped):
            layout = self.layouts[index]
            if layout.pieces is None:
                self.entries.append((k, None, 0))
            else:
                self.entries.extend((k, piece, piece.slot) for piece in layout.pieces)
        self.whole_numels = [self.layouts[self.stepped[k]].whole_numels[slot] for k, _, slot in self.entries]
        # Per stepped tensor, how many entries it has (1 for a whole tensor).
        self.pieces_per_tensor = [0] * len(self.stepped)
        for k, _, _ in self.entries:
            self.pieces_per_tensor[k] += 1
        # Every entry a whole plain tensor (one process, DDP, FSDP1 NO_SHARD): views are the
        # tensors themselves, which `views` then returns without a look at each.
        self._whole_plain = all(piece is None for _, piece, _ in self.entries) and all(
            layout.engine != DTENSOR_ENGINE for layout in self.layouts
        )
        # Reduction domains: one vector per tuple of process groups, one slot per original
        # tensor of every tensor of the group that is reduced over those groups, in the
        # group's order, so that the vectors line up on every rank.
        self.domains: dict[tuple[Any, ...], int] = {}
        offsets: dict[int, tuple[tuple[Any, ...], int]] = {}
        for index, layout in enumerate(self.layouts):
            if layout.groups:
                size = self.domains.get(layout.groups, 0)
                offsets[index] = (layout.groups, size)
                self.domains[layout.groups] = size + layout.slots
        # Per domain: which entries go into its vector, and at which slots.
        self.members: dict[tuple[Any, ...], tuple[list[int], list[int]]] = {groups: ([], []) for groups in self.domains}
        for i, (k, _, slot) in enumerate(self.entries):
            place = offsets.get(self.stepped[k])
            if place is not None:
                self.members[place[0]][0].append(i)
                self.members[place[0]][1].append(place[1] + slot)

    def views(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Per-entry views of per-stepped-tensor `tensors` (parameters, gradients, moments)."""
        if self._whole_plain:
            return list(tensors)
        out = []
        for k, piece, _ in self.entries:
            tensor = local(tensors[k])
            out.append(tensor if piece is None else tensor.view(-1).narrow(0, piece.start, piece.numel))
        return out

    def whole_sums(self, local_sums: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Per-entry sums over the whole original tensors, from per-entry local sums (float64).

        Returns them with the reduced vectors themselves, which hold every original tensor
        of the group (also those this rank holds nothing of) for a global finiteness check.
        One all-reduce per domain and process group, on every rank, whatever it holds.
        """
        if not self.domains:
            return local_sums, []
        local_sums = local_sums.to(self.device)
        whole = local_sums.clone()
        vectors = []
        for groups, size in self.domains.items():
            members, slots = self.members[groups]
            vector = torch.zeros(size, dtype=torch.float64, device=self.device)
            if members:
                index = torch.tensor(members, dtype=torch.long, device=self.device)
                slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
                vector.index_add_(0, slot_index, local_sums.index_select(0, index))
            for group in groups:
                dist.all_reduce(vector, group=group)
            if members:
                whole.index_copy_(0, index, vector.index_select(0, slot_index))
            vectors.append(vector)
        return whole, vectors

    def name_of_first_nonfinite(self, whole: Tensor, vectors: list[Tensor]) -> Optional[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the first original tensor whose sum is not finite, if any."""
        bad = torch.nonzero(~torch.isfinite(whole)).flatten().tolist()
        if bad:
            k, _, slot = self.entries[bad[0]]
            layout = self.layouts[self.stepped[k]]
            return layout.names[slot], layout.shapes[slot]
        for (groups, _), vector in zip(self.domains.items(), vectors):
            bad = torch.nonzero(~torch.isfinite(vector)).flatten().tolist()
            if not bad:
                continue
            offset = 0
            for layout in self.layouts:
                if layout.groups != groups:
                    continue
                if offset <= bad[0] < offset + layout.slots:
                    return layout.names[bad[0] - offset], layout.shapes[bad[0] - offset]
                offset += layout.slots
        return None
