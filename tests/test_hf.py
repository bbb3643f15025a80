"""softadam_nlp.hf with real transformers objects: factory, schedules, and Trainer runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    MarianConfig,
    MarianMTModel,
    Trainer,
    TrainingArguments,
)

from softadam_nlp import SoftAdam
from softadam_nlp.eta_schedule import eta_at
from softadam_nlp.hf import (
    METRIC_DRIVEN_SCHEDULES,
    SCHEDULE_NAMES,
    ScheduleAtFirstStep,
    build_optimizers,
    create_optimizer,
    create_optimizer_and_scheduler,
    optimizer_cls_and_kwargs,
)


def training_args(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", learning_rate=0.1, disable_tqdm=True, seed=0
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "bert": BertForMaskedLM(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)),
        "marian": MarianMTModel(
            MarianConfig(
                vocab_size=50,
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                max_position_embeddings=32,
                pad_token_id=0,
                decoder_start_token_id=0,
            )
        ),
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


def test_a_length_left_to_the_data_loader_outside_trainer_fails_at_the_first_step(tmp_path: Path) -> None:
    args = training_args(tmp_path, num_train_epochs=3)  # length known only from the data loader
    optimizer, scheduler = create_optimizer_and_scheduler(tiny_models()["gpt2"], args)
    assert isinstance(scheduler, ScheduleAtFirstStep) and scheduler.get_last_lr() == [0.1, 0.1]
    with pytest.raises(ValueError, match="no Trainer holds this schedule. Pass num_training_steps=ceil"):
        optimizer.step()
    _, scheduler = create_optimizer_and_scheduler(tiny_models()["gpt2"], args, num_training_steps=30)
    assert scheduler.lr_lambdas[0](15) == pytest.approx(0.5)
    # Schedules that need no length are built at once, greedy included.
    for name in ("constant", "reduce_lr_on_plateau", "greedy"):
        _, scheduler = create_optimizer_and_scheduler(tiny_models()["gpt2"], args, lr_scheduler_type=name)
        assert not isinstance(scheduler, ScheduleAtFirstStep), name
    # A warmup given as a ratio of training needs the length.
    ratio = training_args(tmp_path, num_train_epochs=3, warmup_steps=0.1)
    _, scheduler = create_optimizer_and_scheduler(
        tiny_models()["gpt2"], ratio, lr_scheduler_type="constant_with_warmup"
    )
    assert isinstance(scheduler, ScheduleAtFirstStep)


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
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=20,
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def train(tmp_path: Path, resume: str | None = None, **kwargs) -> tuple[Trainer, list[dict]]:
    args = training_args(
        tmp_path,
        max_steps=40,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        logging_steps=1,
        save_steps=20,
        learning_rate=0.3,
        **kwargs,
    )
    model = gpt2_without_dropout()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=MarkovDataset(400, seed=1),
        optimizers=create_optimizer_and_scheduler(model, args, eta=1.0),
    )
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
    args = training_args(
        tmp_path, max_steps=10, deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    )
    model = tiny_models()["gpt2"]
    for build in (
        lambda: create_optimizer_and_scheduler(model, args),
        lambda: create_optimizer(model, args),
        lambda: build_optimizers("adamw", model, args),
    ):
        with pytest.raises(ValueError, match="optimizer_cls_and_kwargs=softadam_nlp.hf.optimizer_cls_and_kwargs"):
            build()
    cls, kwargs = optimizer_cls_and_kwargs(args, eta=0.5)  # the route that works there
    assert cls is SoftAdam and kwargs["eta"] == 0.5


# --- Trainer used the usual way: every schedule name, every eta schedule, length by epochs ---

# The schedule-specific settings transformers' schedules cannot do without.
SCHEDULE_KWARGS = {
    "cosine_with_min_lr": {"min_lr": 0.01},
    "cosine_warmup_with_min_lr": {"min_lr": 0.01},
    "warmup_stable_decay": {"num_decay_steps": 2},
}


def epoch_trainer(tmp_path: Path, optimizers=None, **kwargs) -> Trainer:
    """Trainer whose length is set by epochs, as TrainingArguments' defaults set it:
    2 epochs of 3 batches; evaluation every 2 steps, which metric-driven schedules step on."""
    settings = dict(
        num_train_epochs=2,
        per_device_train_batch_size=16,
        logging_steps=1,
        save_steps=3,
        eval_strategy="steps",
        eval_steps=2,
        metric_for_best_model="loss",
        learning_rate=0.3,
    )
    args = training_args(tmp_path, **{**settings, **kwargs})
    model = gpt2_without_dropout()
    if callable(optimizers):
        optimizers = optimizers(model, args)
    return Trainer(
        model=model,
        args=args,
        train_dataset=MarkovDataset(48, seed=1),
        eval_dataset=MarkovDataset(16, seed=2),
        optimizers=optimizers or (None, None),
    )


def lr_log(trainer: Trainer) -> list[float]:
    return [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_name_with_every_eta_schedule_trains_or_is_refused(name: str, tmp_path: Path) -> None:
    kwargs = dict(
        lr_scheduler_type=name if name != "step" else "linear",
        warmup_steps=2,
        lr_scheduler_kwargs=SCHEDULE_KWARGS.get(name, {}),
    )
    if name != "step":  # the schedule Trainer builds itself from the same arguments
        reference = epoch_trainer(
            tmp_path / "reference", optimizers=lambda m, a: (create_optimizer(m, a), None), **kwargs
        )
        reference.train()
        assert reference.state.max_steps == 6
    for eta_schedule in ("constant", "linear", "cosine"):
        eta = {} if eta_schedule == "constant" else dict(eta_schedule=eta_schedule, eta_end=0.25)

        def factory(model, args, eta=eta):
            return create_optimizer_and_scheduler(model, args, lr_scheduler_type=name, eta=2.0, **eta)

        if eta and name in METRIC_DRIVEN_SCHEDULES:
            with pytest.raises(ValueError, match=f"eta_schedule='{eta_schedule}' cannot go with .*{name}"):
                epoch_trainer(tmp_path / eta_schedule, optimizers=factory, **kwargs)
            continue
        trainer = epoch_trainer(tmp_path / eta_schedule, optimizers=factory, **kwargs)
        trainer.train()
        lrs = lr_log(trainer)
        assert len(lrs) == 6
        if name != "step":
            assert lrs == pytest.approx(lr_log(reference), rel=1e-12), eta_schedule
        else:
            assert lrs == pytest.approx([0.0, 0.15, 0.3, 0.03, 0.003, 0.003]), lrs  # warmup 2, x0.1 at 3 and 4
        optimizer = softadam_of(trainer)
        expected_eta = 2.0 if not eta else eta_at(6, eta_schedule, 2.0, 0.25, 6)
        assert optimizer.param_groups[0]["eta"] == pytest.approx(expected_eta)


def train_by_epochs(tmp_path: Path, resume: str | None = None, **factory_kwargs) -> Trainer:
    trainer = epoch_trainer(
        tmp_path,
        optimizers=lambda m, a: create_optimizer_and_scheduler(
            m, a, eta=2.0, eta_schedule="linear", eta_end=0.5, **factory_kwargs
        ),
        eval_strategy="no",
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_training_length_by_epochs_equals_the_explicit_length_and_resumes_exactly(tmp_path: Path) -> None:
    explicit = train_by_epochs(tmp_path / "explicit", num_training_steps=6)
    by_epochs = train_by_epochs(tmp_path / "epochs")
    assert isinstance(by_epochs.lr_scheduler, ScheduleAtFirstStep) and by_epochs.lr_scheduler.num_training_steps == 6
    history = [h for h in by_epochs.state.log_history if "loss" in h]
    assert history == [h for h in explicit.state.log_history if "loss" in h]
    assert [h["learning_rate"] for h in history] == pytest.approx([0.3 * (6 - k) / 6 for k in range(6)])
    resumed = train_by_epochs(tmp_path / "resumed", resume=str(tmp_path / "epochs" / "out" / "checkpoint-3"))
    assert [h for h in resumed.state.log_history if "loss" in h] == history
    assert softadam_of(resumed).param_groups[0]["eta"] == softadam_of(by_epochs).param_groups[0]["eta"] == 0.5
