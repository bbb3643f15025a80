"""Run by tests/test_hf_distributed.py: Trainer with SoftAdam from the factory, on CPU.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/hf_distributed_worker.py MODE OUT
    python tests/hf_distributed_worker.py single OUT

MODE: ddp, fsdp2, or zero0/zero1/zero2 (DeepSpeed stage 0-2, with SoftAdam through optimizer_cls_and_kwargs,
the route Trainer keeps under DeepSpeed; DS_ACCELERATOR=cpu).

A tiny GPT-2 (random weights, nothing downloaded) trains for STEPS steps on 8 fixed
sequences, all 8 in every step (4 per rank when distributed), so that every launch
sees the same batches whatever order its sampler picks. Rank 0 (or the single process)
writes the full parameters to OUT/<mode>.pt, with what the optimizer held.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

STEPS = 5
SEQUENCES = 8


def main(mode: str, out: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from softadam_nlp.hf import create_optimizer_and_scheduler, optimizer_cls_and_kwargs

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, 50, (SEQUENCES, 16), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    distributed = mode != "single"
    extra = {}
    if mode == "fsdp2":
        extra = dict(
            fsdp="full_shard",
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "reshard_after_forward": True},
        )
    if mode.startswith("zero"):
        extra = dict(
            deepspeed={
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": int(mode[-1])},
                "gradient_clipping": "auto",
            }
        )
    args = TrainingArguments(
        output_dir=str(out / f"trainer-{mode}"),
        per_device_train_batch_size=SEQUENCES // 2 if distributed else SEQUENCES,
        max_steps=STEPS,
        learning_rate=0.01,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        use_cpu=not mode.startswith("zero"),
        ddp_backend="gloo" if distributed else None,
        **extra,
    )
    if mode.startswith("zero"):
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args)
        )
    else:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            optimizers=create_optimizer_and_scheduler(model, args, num_training_steps=STEPS),
        )
    trainer.train()
    optimizer = trainer.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ != "SoftAdam":
        inner = getattr(optimizer, "optimizer", None)  # accelerate's and DeepSpeed's wrappers
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    # DeepSpeed steps its flat partitions of the tensors SoftAdam was built with, the model's.
    built_with = [p for group in optimizer._built_with for p in group] if mode.startswith("zero") else stepped
    params = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in trainer.model.named_parameters()
    }
    info = {
        "optimizer": type(optimizer).__name__,
        "steps": [optimizer.state[p]["step"].item() for p in stepped],
        # The optimizer must hold the parameters the model trains (FSDP2 replaces them with DTensors).
        "holds_model_parameters": {id(p) for p in built_with} == {id(p) for p in trainer.model.parameters()},
        "dtensor": any(type(p).__name__.endswith("DTensor") or hasattr(p, "full_tensor") for p in stepped),
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
    }
    if trainer.args.process_index == 0:
        torch.save({"params": params, "info": info}, out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
