"""Eta schedules through the two toolkits: fairseq's --softadam-eta-schedule and the HF factory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fairseq import optim  # noqa: E402
from test_fairseq_plugin import model, training_cfg  # noqa: E402  (also registers the plugin)

from softadam_nlp.eta_schedule import WithEtaSchedule, eta_at
from softadam_nlp.hf import create_optimizer_and_scheduler


def fairseq_optimizer(*args: str):
    return optim.build_optimizer(training_cfg("--lr", "0.1", *args).optimizer, list(model().parameters()))


def fairseq_steps(fs_opt, steps: int, seed: int = 0) -> list[float]:
    """Take ``steps`` updates with random gradients; the eta each one used."""
    g = torch.Generator().manual_seed(seed)
    used = []
    for _ in range(steps):
        for p in fs_opt.params:
            p.grad = torch.randn(p.shape, generator=g)
        fs_opt.step()
        used.append(fs_opt.optimizer.param_groups[0]["eta"])
    return used


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_fairseq_eta_follows_the_update_count_and_survives_a_resume(schedule: str) -> None:
    args = ("--softadam-eta", "2", "--softadam-eta-schedule", schedule, "--softadam-eta-end", "0", "--max-update", "8")
    straight = fairseq_optimizer(*args)
    used = fairseq_steps(straight, 10)
    assert used == pytest.approx([eta_at(k, schedule, 2.0, 0.0, 8) for k in range(10)])
    assert used[0] == 2.0 and used[-1] == 0.0

    first = fairseq_optimizer(*args)
    fairseq_steps(first, 4)
    saved = copy.deepcopy(first.state_dict())
    resumed = fairseq_optimizer(*args)
    resumed.load_state_dict(saved, optimizer_overrides=resumed.optimizer_config)  # as fairseq resumes
    assert fairseq_steps(resumed, 6, seed=99)[0] == pytest.approx(eta_at(4, schedule, 2.0, 0.0, 8))


def test_fairseq_constant_is_the_default_and_bad_schedules_name_the_options() -> None:
    fs_opt = fairseq_optimizer("--softadam-eta", "3")
    assert fairseq_steps(fs_opt, 3) == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="--softadam-eta-schedule linear .* needs eta_end >= 0"):
        fairseq_optimizer("--softadam-eta-schedule", "linear", "--max-update", "10")
    with pytest.raises(ValueError, match="--softadam-eta-schedule cosine .* needs total_steps > 0"):
        fairseq_optimizer("--softadam-eta-schedule", "cosine", "--softadam-eta-end", "0")  # --max-update 0


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=40,
            n_positions=8,
            n_embd=16,
            n_layer=1,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def trainer_run(out: Path, stop_at: int | None = None, resume: str | None = None):
    """A Trainer run of 6 steps with a linear eta schedule from 1 to 0; returns the eta used
    at each step taken and the model."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    used: list[float] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            used.append(optimizer.param_groups[0]["eta"])

        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step == stop_at:
                control.should_training_stop = True

    model = tiny_gpt2()
    tokens = torch.randint(0, 40, (16, 8), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        logging_steps=1,
    )
    optimizers = create_optimizer_and_scheduler(model, args, eta_schedule="linear", eta_end=0.0)
    assert isinstance(optimizers[1], WithEtaSchedule)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=[{"input_ids": t, "labels": t} for t in tokens],
        optimizers=optimizers,
        callbacks=[Watch()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return used, model


def test_trainer_steps_the_eta_schedule_with_the_lr_and_resumes_it(tmp_path: Path) -> None:
    used, straight = trainer_run(tmp_path / "straight")
    assert used == pytest.approx([1 - k / 6 for k in range(6)])
    first, _ = trainer_run(tmp_path / "resumed", stop_at=3)
    assert first == pytest.approx(used[:3])
    after, resumed = trainer_run(tmp_path / "resumed", resume=str(tmp_path / "resumed" / "checkpoint-3"))
    assert after == pytest.approx(used[3:])
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_factory_refuses_what_it_cannot_schedule(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])  # no max_steps
    net = torch.nn.Linear(2, 2)
    # Without a length, the schedule waits for the Trainer that knows it; outside one, the first step says so.
    optimizer, _ = create_optimizer_and_scheduler(net, args, eta_schedule="cosine", eta_end=0.0)
    with pytest.raises(ValueError, match="the training length is not known"):
        optimizer.step()
    with pytest.raises(ValueError, match="needs eta_end >= 0"):
        create_optimizer_and_scheduler(net, args, eta_schedule="cosine")
    with pytest.raises(ValueError, match="unknown eta_schedule 'steps'"):
        create_optimizer_and_scheduler(net, args, num_training_steps=5, eta_schedule="steps")
    with pytest.raises(ValueError, match="eta_end needs a linear or cosine eta_schedule"):
        create_optimizer_and_scheduler(net, args, num_training_steps=5, eta_end=0.0)
