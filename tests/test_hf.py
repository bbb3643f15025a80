"""softadam_nlp.hf with real transformers objects: factory, schedules, and Trainer runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel, Trainer,
    TrainingArguments,
)

from softadam_nlp import SoftAdam
from softadam_nlp.hf import (
    SCHEDULE_NAMES, build_optimizers, create_optimizer, create_optimizer_and_scheduler, optimizer_cls_and_kwargs,
)


def training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", learning_rate=0.1,
                    disable_tqdm=True, seed=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "bert": BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)),
        "marian": MarianMTModel(MarianConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                             encoder_attention_heads=2, decoder_attention_heads=2,
                                             encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                                             pad_token_id=0, decoder_start_token_id=0)),
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "marian"])
def test_weight_decay_groups_match_trainers_own(name: str, tmp_path: Path) -> None:
    model = tiny_models()[name]
    args = training_args(tmp_path, weight_decay=0.01)
    theirs = Trainer(model=model, args=args).create_optimizer()
    ours = create_optimizer(model, args)
    for mine, reference in zip(ours.param_groups, theirs.param_groups):
        assert {id(p) for p in mine["params"]} == {id(p) for p in reference["params"]}
        assert mine["weight_decay"] == reference["weight_decay"]
    no_decay = {n for n, p in model.named_parameters() if any(p is q for q in ours.param_groups[1]["params"])}
    assert no_decay and all(n.endswith("bias") or "norm" in n.lower() or ".ln_" in n for n in no_decay)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant", "polynomial", "inverse_sqrt", "step"])
def test_lr_at_step_zero_is_the_learning_rate_without_warmup(schedule: str, tmp_path: Path) -> None:
    model = tiny_models()["gpt2"]
    args = training_args(tmp_path, max_steps=100)
    optimizer, scheduler = create_optimizer_and_scheduler(model, args, lr_scheduler_type=schedule, eta=2.0)
    assert isinstance(optimizer, SoftAdam) and optimizer.param_groups[0]["eta"] == 2.0
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1)


def lr_curve(schedule: str, tmp_path: Path, steps: int = 100, **kwargs) -> list[float]:
    args = training_args(tmp_path, max_steps=steps, **kwargs)
    optimizer, scheduler = create_optimizer_and_scheduler(tiny_models()["gpt2"], args, lr_scheduler_type=schedule)
    curve = []
    for _ in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve + [optimizer.param_groups[0]["lr"]]


def test_schedule_shapes(tmp_path: Path) -> None:
    linear = lr_curve("linear", tmp_path)
    assert linear[50] == pytest.approx(0.05) and linear[100] == 0.0
    cosine = lr_curve("cosine", tmp_path)
    assert cosine[50] == pytest.approx(0.05) and cosine[25] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    step = lr_curve("step", tmp_path)
    assert step[49] == pytest.approx(0.1) and step[50] == pytest.approx(0.01)
    assert step[74] == pytest.approx(0.01) and step[75] == pytest.approx(0.001)
    constant = lr_curve("constant", tmp_path)
    assert set(constant) == {0.1}
    inverse_sqrt = lr_curve("inverse_sqrt", tmp_path)
    assert all(a > b for a, b in zip(inverse_sqrt, inverse_sqrt[1:]))


def test_warmup_steps_and_ratio(tmp_path: Path) -> None:
    steps = lr_curve("linear", tmp_path, warmup_steps=10)
    assert steps[0] == 0.0 and steps[5] == pytest.approx(0.05) and steps[10] == pytest.approx(0.1)
    ratio = lr_curve("step", tmp_path, warmup_steps=0.2)  # 20% of 100 steps
    assert ratio[10] == pytest.approx(0.05) and ratio[20] == pytest.approx(0.1) and ratio[50] == pytest.approx(0.01)


def test_missing_training_length_fails_with_instructions(tmp_path: Path) -> None:
    args = training_args(tmp_path, num_train_epochs=3)  # length known only from the data loader
    with pytest.raises(ValueError, match="num_training_steps=ceil"):
        create_optimizer_and_scheduler(tiny_models()["gpt2"], args)
    _, scheduler = create_optimizer_and_scheduler(tiny_models()["gpt2"], args, num_training_steps=30)
    assert scheduler.lr_lambdas[0](15) == pytest.approx(0.5)
    _, constant = create_optimizer_and_scheduler(tiny_models()["gpt2"], args, lr_scheduler_type="constant")
    assert constant.get_last_lr() == [0.1, 0.1]


def test_bad_arguments(tmp_path: Path) -> None:
    args = training_args(tmp_path, max_steps=10)
    with pytest.raises(ValueError, match="unknown lr_scheduler_type"):
        create_optimizer_and_scheduler(tiny_models()["gpt2"], args, lr_scheduler_type="triangle")
    with pytest.raises(TypeError, match="weight_decay"):
        create_optimizer_and_scheduler(tiny_models()["gpt2"], args, weight_decay=0.1)
    assert "step" in SCHEDULE_NAMES and "linear" in SCHEDULE_NAMES


def test_optimizer_cls_and_kwargs_with_trainer(tmp_path: Path) -> None:
    model = tiny_models()["gpt2"]
    args = training_args(tmp_path, weight_decay=0.01, adam_beta2=0.98)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, eta=3.0))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, SoftAdam)
    assert optimizer.param_groups[0]["eta"] == 3.0 and optimizer.param_groups[0]["betas"] == (0.9, 0.98)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


# --- Real Trainer runs on generated data -------------------------------------------

class MarkovDataset(torch.utils.data.Dataset):
    """Sequences from a sparse first-order chain over 20 tokens (the best loss is log 2)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, 20, (20, 2), generator=torch.Generator().manual_seed(0))
        self.rows = []
        for _ in range(n):
            seq = [int(torch.randint(0, 20, (1,), generator=g))]
            for _ in range(15):
                seq.append(int(successors[seq[-1], int(torch.randint(0, 2, (1,), generator=g))]))
            self.rows.append(torch.tensor(seq))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def gpt2_without_dropout() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def train(tmp_path: Path, resume: str | None = None, **kwargs) -> tuple[Trainer, list[dict]]:
    args = training_args(tmp_path, max_steps=40, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         max_grad_norm=1.0, logging_steps=1, save_steps=20, learning_rate=0.3, **kwargs)
    model = gpt2_without_dropout()
    trainer = Trainer(model=model, args=args, train_dataset=MarkovDataset(400, seed=1),
                      optimizers=create_optimizer_and_scheduler(model, args, eta=1.0))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def softadam_of(trainer: Trainer) -> SoftAdam:
    """The optimizer in use, under accelerate's AcceleratedOptimizer wrapper."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, SoftAdam)
    return optimizer


def test_trainer_trains_with_softadam_and_resumes_exactly(tmp_path: Path) -> None:
    trainer, log = train(tmp_path / "straight")
    optimizer = softadam_of(trainer)
    assert [h["step"] for h in log] == list(range(1, 41))
    assert log[0]["learning_rate"] == pytest.approx(0.3)  # no warmup: the first step at the peak
    assert sum(h["loss"] for h in log[-5:]) / 5 < sum(h["loss"] for h in log[:5]) / 5 - 1.0
    # SoftAdam took 40 optimizer steps (80 micro-batches with accumulation 2).
    assert {s["step"].item() for s in optimizer.state.values()} == {40.0}

    checkpoint = tmp_path / "straight" / "out" / "checkpoint-20"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    resumed_trainer, resumed = train(tmp_path / "resumed", resume=str(checkpoint))
    # The resumed history starts with the checkpoint's own first 20 entries.
    assert [h["step"] for h in resumed] == list(range(1, 41))
    resumed = resumed[20:]
    expected = {h["step"]: h for h in log}
    for h in resumed:
        assert h["loss"] == pytest.approx(expected[h["step"]]["loss"], rel=1e-5)
        assert h["learning_rate"] == pytest.approx(expected[h["step"]]["learning_rate"])
        assert h["grad_norm"] == pytest.approx(expected[h["step"]]["grad_norm"], rel=1e-4)
    assert {s["step"].item() for s in softadam_of(resumed_trainer).state.values()} == {40.0}


def test_trainer_bf16_mixed_precision_on_cpu(tmp_path: Path) -> None:
    trainer, log = train(tmp_path, bf16=True, save_strategy="no")
    assert sum(h["loss"] for h in log[-5:]) / 5 < sum(h["loss"] for h in log[:5]) / 5 - 1.0
    for p in trainer.model.parameters():
        assert p.dtype == torch.float32  # autocast: fp32 weights, bf16 compute
        assert softadam_of(trainer).state[p]["exp_avg"].dtype == torch.float32


def test_factory_names_the_parameter_with_a_nonfinite_gradient(tmp_path) -> None:
    from transformers import TrainingArguments

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.1, weight_decay=0.01, report_to=[])
    optimizer, _ = create_optimizer_and_scheduler(model, args, num_training_steps=10)
    model(torch.randn(2, 3)).sum().backward()
    model[1].bias.grad[0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter '1\.bias' \(shape \(4,\)\) is not finite"):
        optimizer.step()
    optimizer, _ = create_optimizer_and_scheduler(model, args, num_training_steps=10, nonfinite="skip")
    optimizer.step()
    assert optimizer.skipped_steps == 1


def test_factory_refuses_deepspeed_and_points_to_optimizer_cls_and_kwargs(tmp_path: Path, monkeypatch) -> None:
    # Under DeepSpeed, Trainer replaces an optimizer given as optimizers=(...) with its own
    # AdamW without a word; the factory refuses instead (Trainer with DeepSpeed through
    # optimizer_cls_and_kwargs is tests/test_hf_distributed.py).
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    args = training_args(tmp_path, max_steps=10, deepspeed={"zero_optimization": {"stage": 2},
                                                            "train_micro_batch_size_per_gpu": "auto"})
    model = tiny_models()["gpt2"]
    for build in (lambda: create_optimizer_and_scheduler(model, args), lambda: create_optimizer(model, args),
                  lambda: build_optimizers("adamw", model, args)):
        with pytest.raises(ValueError, match="optimizer_cls_and_kwargs=softadam_nlp.hf.optimizer_cls_and_kwargs"):
            build()
    cls, kwargs = optimizer_cls_and_kwargs(args, eta=0.5)  # the route that works there
    assert cls is SoftAdam and kwargs["eta"] == 0.5
