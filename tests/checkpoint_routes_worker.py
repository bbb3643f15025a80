"""Run by tests/test_checkpoints.py: every engine's own checkpoint route, for SoftAdam in
every execution and for AdamW as the control, on CPU processes with gloo.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc-per-node 2 \
        tests/checkpoint_routes_worker.py save OUT_DIR
    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc-per-node 1 \
        tests/checkpoint_routes_worker.py load OUT_DIR

``save`` (2 ranks) trains the small model of tests/sharded_worker.py for SAVED_AT steps
under each engine, writes a checkpoint by each of the engine's routes, loads each into a
fresh 2-rank wrapper and trains the remaining steps. ``load`` (one process) loads the same
checkpoints into one plain process (DeepSpeed's after ``ds_to_universal``) and trains the
remaining steps on the combined batch. Both compare the full parameters after every
remaining step with one uninterrupted process on the combined batch, and write
OUT_DIR/results-<phase>.pt: case -> the largest relative error, or what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_worker import (  # noqa: E402
    BATCH,
    EXECUTIONS,
    LR,
    STEPS,
    batches,
    build_model,
    clean,
    loss_of,
    param_groups,
    quiet_deepspeed,
    relative_error,
)

from softadam_nlp import SoftAdam  # noqa: E402
from softadam_nlp.layout import local  # noqa: E402

SAVED_AT = 2  # steps before the checkpoint; STEPS - SAVED_AT after it
OPTIMIZERS = [*EXECUTIONS, "adamw"]  # SoftAdam in every execution, and AdamW through the same routes
FSDP1_ROUTES = [(orig, kind) for orig in (False, True) for kind in ("full", "sharded")]
FSDP2_ROUTES = ["sharded", "full"]
ZERO_STAGES = [1, 2]
ADAMW_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    return SoftAdam(params, lr=LR, **EXECUTIONS[name])


def share(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = BATCH // world
    return tensor[rank * size : (rank + 1) * size]


def plain_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        clean(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    full_parameters: Callable[[], dict[str, torch.Tensor]],
    step: Optional[Callable[[], None]] = None,
) -> list[dict[str, torch.Tensor]]:
    """The given steps on this rank's share of each batch; the full parameters after each."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    snapshots, all_batches = [], batches()
    for index in steps:
        inputs, targets = all_batches[index]
        optimizer.zero_grad()
        loss_of(model, share(inputs, rank, world), share(targets, rank, world)).backward()
        (step or optimizer.step)()
        snapshots.append(full_parameters())
    return snapshots


def uninterrupted(name: str, grouped: bool = False) -> list[dict[str, torch.Tensor]]:
    """One process, no wrapper, the combined batch, all STEPS steps (with `grouped`, the two
    param groups of the DeepSpeed cases)."""
    model = build_model()
    optimizer = make_optimizer(name, param_groups(model, grouped) if grouped else model.parameters())
    snapshots = []
    for inputs, targets in batches():
        optimizer.zero_grad()
        loss_of(model, inputs, targets).backward()
        optimizer.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots


def error_after_resuming(ours: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> float:
    """The largest relative error over the steps after the checkpoint."""
    assert len(ours) == STEPS - SAVED_AT
    return relative_error(ours, want[SAVED_AT:])


def own_shapes(optimizer: torch.optim.Optimizer) -> bool:
    """The loaded state has the target's own form: AdamW's keys, shaped like what it steps."""
    return all(
        set(state) == ADAMW_KEYS and all(local(state[k]).shape == local(p).shape for k in ("exp_avg", "exp_avg_sq"))
        for p, state in optimizer.state.items()
    )


def outcome_of(action: Callable[[], object]) -> str:
    try:
        action()
        return "ok"
    except Exception as error:  # noqa: BLE001 - what the engine said, for the test to read
        print(f"rank {dist.get_rank()}: {type(error).__name__}: {error}", file=sys.stderr)
        return f"{type(error).__name__}: {error}"


# --- FSDP1 ---------------------------------------------------------------------------------


def fsdp1_model(orig: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(
        build_model(),
        use_orig_params=orig,
        auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear, torch.nn.Embedding}),
        device_id=torch.device("cpu"),
    )


def fsdp1_full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        return plain_parameters(model)


@contextlib.contextmanager
def fsdp1_state_dict_type(model: torch.nn.Module, kind: str):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if kind == "full":
        # Every rank gets the whole state (rank0_only=False), to load on 2 ranks and to save on
        # rank 0. offload_to_cpu stays off: the parameters are on the CPU already, and with
        # use_orig_params=True it made FSDP's model.state_dict() segfault (torch 2.13, gloo).
        with FSDP.state_dict_type(
            model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=False),
        ):
            yield
    else:
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            yield


def save_by_each_route(state_of: Callable[[str], dict], folders: dict[str, Path]) -> dict[str, str]:
    """Write each route's checkpoint (state dict type -> folder) of the state `state_of`
    gives for it: "full" as one file from rank 0, "sharded" with torch.distributed.checkpoint.
    Returns what each save did."""
    import torch.distributed.checkpoint as dcp

    def save(kind: str, folder: Path) -> None:
        state = state_of(kind)
        if kind == "full":
            if dist.get_rank() == 0:
                torch.save(state, folder / "full.pt")
        else:
            dcp.save(state, checkpoint_id=str(folder))

    outcomes = {}
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        outcomes[kind] = outcome_of(lambda: save(kind, folder))  # noqa: B023 - called at once
        dist.barrier()
    return outcomes


def fsdp1_save(orig: bool, name: str, folders: dict[str, Path]) -> dict[str, str]:
    """Train SAVED_AT steps, then save by each route (state dict type -> folder)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = fsdp1_model(orig)
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(SAVED_AT), lambda: {})

    def state_of(kind: str) -> dict:
        with fsdp1_state_dict_type(model, kind):
            return {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, optimizer)}

    return save_by_each_route(state_of, folders)


def fsdp1_resume(orig: bool, kind: str, name: str, folder: Path) -> tuple[list, bool]:
    """A fresh FSDP1 wrapper on the same 2 ranks, by the route that wrote the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = fsdp1_model(orig)
    optimizer = make_optimizer(name, model.parameters())
    with fsdp1_state_dict_type(model, kind):
        if kind == "full":
            state = torch.load(folder / "full.pt", weights_only=False)
            model.load_state_dict(state["model"])
            optim_state = state["optim"]
        else:
            model_state = {"model": model.state_dict()}
            dcp.load(model_state, checkpoint_id=str(folder))
            model.load_state_dict(model_state["model"])
            optim_state = load_sharded_optimizer_state_dict(
                model_state_dict=model_state["model"],
                optimizer_key="optim",
                storage_reader=dcp.FileSystemReader(folder),
            )["optim"]
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer, optim_state))
    shapes = own_shapes(optimizer)
    return train(model, optimizer, range(SAVED_AT, STEPS), lambda: fsdp1_full_parameters(model)), shapes


# --- FSDP2 ---------------------------------------------------------------------------------


def fsdp2_model() -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_model()
    for module in model:
        if any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2_options(kind: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=kind == "full", cpu_offload=kind == "full")


def fsdp2_save(name: str, folders: dict[str, Path]) -> dict[str, str]:
    """As `fsdp1_save`, for FSDP2 with torch.distributed.checkpoint's state dicts."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = fsdp2_model()
    optimizer = make_optimizer(name, model.parameters())
    train(model, optimizer, range(SAVED_AT), lambda: {})

    def state_of(kind: str) -> dict:
        model_state, optim_state = get_state_dict(model, optimizer, options=fsdp2_options(kind))
        return {"model": model_state, "optim": optim_state}

    return save_by_each_route(state_of, folders)


def dcp_resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, kind: str, folder: Path) -> None:
    """torch.distributed.checkpoint's own route, for an FSDP2 model and for a plain one alike."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if kind == "full":
        state = torch.load(folder / "full.pt", weights_only=False)
        model_state, optim_state = state["model"], state["optim"]
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=fsdp2_options(kind)
    )


def fsdp2_resume(kind: str, name: str, folder: Path) -> tuple[list, bool]:
    """A fresh FSDP2 model on the same 2 ranks, by torch.distributed.checkpoint's route."""
    model = fsdp2_model()
    optimizer = make_optimizer(name, model.parameters())
    dcp_resume(model, optimizer, kind, folder)
    shapes = own_shapes(optimizer)
    return train(model, optimizer, range(SAVED_AT, STEPS), lambda: plain_parameters(model)), shapes


def fsdp2_rebuilt_means(kind: str, name: str, folder: Path) -> float:
    """The rule for the means of v after a load, pinned on sharded tensors: loaded into a
    fresh FSDP2 model, one step with all-zero gradients leaves each mean at (1 - w) times
    the rebuilt one, w = max(1 - beta2, 1/t), and the rebuilt one must be the float64 mean
    of the loaded v over the whole tensor (both ranks' shards). The largest relative
    difference from the rule, which allows only for the order of float64 additions."""
    model = fsdp2_model()
    optimizer = make_optimizer(name, model.parameters())
    dcp_resume(model, optimizer, kind, folder)
    params = list(model.parameters())
    loaded = [optimizer.state[p]["exp_avg_sq"].full_tensor().double() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    worst = 0.0
    for p, v in zip(params, loaded):
        w = max(1 - 0.999, 1 / float(optimizer.state[p]["step"]))
        want = (1 - w) * (v.sum() / v.numel())
        worst = max(worst, float((optimizer._kept_means[p].value - want).abs() / want))
    return worst


# --- DeepSpeed -----------------------------------------------------------------------------


def deepspeed_engine(stage: int, name: str, universal: bool = False):
    import deepspeed

    model = build_model()
    optimizer = make_optimizer(name, param_groups(model, grouped=True))
    world = dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0, which the reference does not
        "steps_per_print": 10**9,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    with contextlib.redirect_stdout(io.StringIO()):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, model, optimizer


def deepspeed_train(engine, model: torch.nn.Module, steps: range) -> list[dict[str, torch.Tensor]]:
    world = dist.get_world_size()
    rank = dist.get_rank()
    snapshots, all_batches = [], batches()
    for index in steps:
        inputs, targets = all_batches[index]
        engine.backward(loss_of(engine, share(inputs, rank, world), share(targets, rank, world)))
        engine.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return snapshots


# --- the phases ------------------------------------------------------------------------------


def save_phase(out: Path) -> dict[str, object]:
    results: dict[str, object] = {}
    references = {name: uninterrupted(name) for name in OPTIMIZERS}
    grouped_references = {name: uninterrupted(name, grouped=True) for name in OPTIMIZERS}
    for orig in sorted({orig for orig, _ in FSDP1_ROUTES}):
        for name in OPTIMIZERS:
            cases = {kind: f"fsdp1-orig{orig}-{kind}-{name}" for o, kind in FSDP1_ROUTES if o == orig}
            saved = fsdp1_save(orig, name, {kind: out / case for kind, case in cases.items()})
            for kind, case in cases.items():
                results[f"save-{case}"] = saved[kind]
                if saved[kind] == "ok":
                    snapshots, shapes = fsdp1_resume(orig, kind, name, out / case)
                    results[f"2to2-{case}"] = error_after_resuming(snapshots, references[name])
                    results[f"shapes-2to2-{case}"] = shapes
    for name in OPTIMIZERS:
        cases = {kind: f"fsdp2-{kind}-{name}" for kind in FSDP2_ROUTES}
        saved = fsdp2_save(name, {kind: out / case for kind, case in cases.items()})
        for kind, case in cases.items():
            results[f"save-{case}"] = saved[kind]
            if saved[kind] == "ok" and kind == "sharded":
                snapshots, shapes = fsdp2_resume(kind, name, out / case)
                results[f"2to2-{case}"] = error_after_resuming(snapshots, references[name])
                results[f"shapes-2to2-{case}"] = shapes
                if name != "adamw":
                    results[f"rebuild-2to2-{case}"] = fsdp2_rebuilt_means(kind, name, out / case)
    with quiet_deepspeed():
        for stage in ZERO_STAGES:
            for name in OPTIMIZERS:
                case = f"zero{stage}-{name}"
                engine, model, _ = deepspeed_engine(stage, name)
                deepspeed_train(engine, model, range(SAVED_AT))
                with contextlib.redirect_stdout(io.StringIO()):
                    engine.save_checkpoint(str(out / case), tag="step2")
                engine, model, optimizer = deepspeed_engine(stage, name)
                with contextlib.redirect_stdout(io.StringIO()):
                    engine.load_checkpoint(str(out / case), tag="step2")
                snapshots = deepspeed_train(engine, model, range(SAVED_AT, STEPS))
                results[f"2to2-{case}"] = error_after_resuming(snapshots, grouped_references[name])
                results[f"shapes-2to2-{case}"] = own_shapes(optimizer)
    return results


def load_phase(out: Path) -> dict[str, object]:
    """One process: every checkpoint of the save phase into a plain model (DeepSpeed's into
    a 1-rank engine, by its universal checkpoint and by its plain load_checkpoint)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    results: dict[str, object] = {}
    references = {name: uninterrupted(name) for name in OPTIMIZERS}
    grouped_references = {name: uninterrupted(name, grouped=True) for name in OPTIMIZERS}

    def plain_target(name: str, load: Callable[[torch.nn.Module, torch.optim.Optimizer], None]) -> tuple[list, bool]:
        model = build_model()
        optimizer = make_optimizer(name, model.parameters())
        load(model, optimizer)
        shapes = own_shapes(optimizer)
        return train(model, optimizer, range(SAVED_AT, STEPS), lambda: plain_parameters(model)), shapes

    def fsdp1_full_into_plain(folder: Path):
        def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
            # FSDP1's documented route to an unwrapped model: its full state dicts, the
            # optimizer's re-keyed from parameter names to parameter ids.
            state = torch.load(folder / "full.pt", weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(FSDP.rekey_optim_state_dict(state["optim"], OptimStateKeyType.PARAM_ID, model))

        return load

    def dcp_into_plain(kind: str, folder: Path):
        return lambda model, optimizer: dcp_resume(model, optimizer, kind, folder)

    for orig, kind in FSDP1_ROUTES:
        for name in OPTIMIZERS:
            case = f"fsdp1-orig{orig}-{kind}-{name}"
            folder = out / case
            if not (folder / "full.pt").exists() and not (folder / ".metadata").exists():
                continue  # the save itself failed (the save phase's result says how)
            load = fsdp1_full_into_plain(folder) if kind == "full" else dcp_into_plain("sharded", folder)
            snapshots, shapes = plain_target(name, load)
            results[f"2to1-{case}"] = error_after_resuming(snapshots, references[name])
            results[f"shapes-2to1-{case}"] = shapes
    for kind in FSDP2_ROUTES:
        for name in OPTIMIZERS:
            case = f"fsdp2-{kind}-{name}"
            folder = out / case
            if not (folder / "full.pt").exists() and not (folder / ".metadata").exists():
                continue
            snapshots, shapes = plain_target(name, dcp_into_plain(kind, folder))
            results[f"2to1-{case}"] = error_after_resuming(snapshots, references[name])
            results[f"shapes-2to1-{case}"] = shapes

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    with quiet_deepspeed():
        for stage in ZERO_STAGES:
            for name in OPTIMIZERS:
                case = f"zero{stage}-{name}"
                universal = out / f"{case}-universal"
                with contextlib.redirect_stdout(io.StringIO()):
                    ds_to_universal(
                        argparse.Namespace(
                            input_folder=str(out / case / "step2"),
                            output_folder=str(universal / "step2"),
                            num_extract_workers=1,
                            num_merge_workers=1,
                            keep_temp_folder=False,
                            strict=True,
                            inject_missing_state=True,  # for clients other than Megatron-DeepSpeed
                        )
                    )
                engine, model, optimizer = deepspeed_engine(stage, name, universal=True)
                with contextlib.redirect_stdout(io.StringIO()):
                    engine.load_checkpoint(str(universal), tag="step2")
                snapshots = deepspeed_train(engine, model, range(SAVED_AT, STEPS))
                results[f"2to1-universal-{case}"] = error_after_resuming(snapshots, grouped_references[name])
                results[f"shapes-2to1-universal-{case}"] = own_shapes(optimizer)
                # DeepSpeed's plain load_checkpoint of a checkpoint of another world size.
                engine, model, optimizer = deepspeed_engine(stage, name)

                def plain_load(engine=engine, folder: Path = out / case) -> None:
                    with contextlib.redirect_stdout(io.StringIO()):
                        engine.load_checkpoint(str(folder), tag="step2")

                outcome = outcome_of(plain_load)
                if outcome == "ok":
                    snapshots = deepspeed_train(engine, model, range(SAVED_AT, STEPS))
                    outcome = f"ok, relative error {error_after_resuming(snapshots, grouped_references[name]):.2e}"
                results[f"2to1-plain-{case}"] = outcome
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["save", "load"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    results = save_phase(args.out) if args.phase == "save" else load_phase(args.out)
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged: dict[str, object] = {}
        for per_rank in gathered:
            for key, value in per_rank.items():
                if isinstance(value, float) and isinstance(merged.get(key), float):
                    merged[key] = max(merged[key], value)  # the error seen on the worse rank
                elif isinstance(value, bool) and isinstance(merged.get(key), bool):
                    merged[key] = merged[key] and value
                else:
                    merged.setdefault(key, value)
        torch.save(merged, args.out / f"results-{args.phase}.pt")
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in 7 launches (2026-12-03) a rank
    # aborted there, after every result was written ("terminate called without an active
    # exception": a C++ thread of one of the libraries still joinable at exit).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
