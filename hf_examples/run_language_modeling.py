#!/usr/bin/env python
r"""Train a word-level language model on Penn Treebank with the Trainer and SoftAdam.

The paper's Table 2 (3-layer AWD-LSTM, Merity et al. 2017):

    python hf_examples/run_language_modeling.py --optimizer softadam --seed 1 --preset cpu
    python scripts/report.py --experiment ptb --records results/cpu/ptb --plot docs/figures/ptb_cpu_valid_ppl.png

Data: Mikolov's ptb.{train,valid,test}.txt from --data-dir (default: $SOFTADAM_DATA_DIR
or ../shared/data/ptb), loaded with `datasets` and checked against the canonical md5s
(--no-verify for other text in the same layout); or, where the hub is reachable,
--hub-dataset loads the hub's copy (ptb-text-only/ptb_text_only), checked against the
same md5s. The vocabulary is the training
words plus <eos> (a word-level `tokenizers` model), so perplexities are per word.

--model awd_lstm (default) trains as the AWD-LSTM recipe does, through
softadam_nlp.experiments.bptt.BPTTTrainer: contiguous streams, hidden state carried
across segments, variable BPTT length with the learning rate scaled by seq_len/bptt,
whole-split evaluation (valid batch 10, test batch 1), the best epoch by validation
loss kept. Presets: `paper` (the recipe's sizes, 500 epochs: a GPU run), `cpu` (a
smaller model for about 20 minutes on 2 CPU cores), `tiny` (tests). SoftAdam uses weight
drop 0.6 instead of 0.5, as the paper does. The run's record (same format as the IWSLT
experiment's) goes to RESULTS/<optimizer>-seed<N>.json when it has finished; RESULTS is
--results, by default runs/results/<preset>/ptb (the committed records under results/
are written only by commands that name them). A record there with the same settings
means the run has finished and is skipped (--force reruns); one with other settings is
an error that says what differs. A crashed run resumes from its last epoch checkpoint
in --output-dir.

--model gpt2 trains a small GPT-2 on fixed blocks for --max-steps (no record; metrics
in OUTPUT_DIR/metrics.json), to show the factory with a transformers model. An option
of the other model's group is an error.

TrainingArguments' own spellings are accepted too: --learning_rate, --max_steps,
--num_train_epochs, --per_device_train_batch_size, --output_dir, --weight_decay,
--warmup_steps, --max_grad_norm, --lr_scheduler_type, and every option here with
underscores for dashes (--data_dir, --eta_schedule, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from itertools import chain
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from softadam_nlp.data.ptb import EOS, PTB_HUB_DATASET, load_ptb_hub, ptb_files
from softadam_nlp.eta_schedule import eta_schedule_cli_error
from softadam_nlp.experiments.bptt import BPTTTrainer, evaluate_stream, segments_per_epoch
from softadam_nlp.experiments.checkpoints import last_complete_checkpoint
from softadam_nlp.experiments.records import (
    RecordConflict,
    default_results,
    finished_with_settings,
    record_path,
    write_record,
)
from softadam_nlp.experiments.runtime import flush_denormals
from softadam_nlp.hf import (
    add_deepspeed_argument,
    add_optimizer_arguments,
    available_reporters,
    deepspeed_cli_error,
    normalize_trainer_spellings,
    optimizers_from_cli,
    trainer_optimizer_arguments,
    trainer_schedule_name,
    training_arguments_cli,
)
from softadam_nlp.models.awd_lstm import AWDLSTMConfig, AWDLSTMForLanguageModeling

REPO = Path(__file__).resolve().parents[1]

# AWD-LSTM presets. Dropouts not listed keep AWDLSTMConfig's recipe values.
# cpu: about 14 minutes alone on the 2-core build machine (docs/RESULTS.md).
PRESETS = {
    "paper": {
        "model": {"embedding_size": 400, "hidden_size": 1150, "num_layers": 3},
        "epochs": 500,
        "batch_size": 20,
        "bptt": 70,
    },
    "cpu": {
        "model": {"embedding_size": 200, "hidden_size": 400, "num_layers": 3},
        "epochs": 3,
        "batch_size": 20,
        "bptt": 70,
    },
    # demo: one epoch of a 2-layer 64/128 model, about 2 minutes alone (`make demo`, docs/RESULTS.md).
    "demo": {
        "model": {"embedding_size": 64, "hidden_size": 128, "num_layers": 2},
        "epochs": 1,
        "batch_size": 20,
        "bptt": 70,
    },
    "tiny": {
        "model": {
            "embedding_size": 16,
            "hidden_size": 32,
            "num_layers": 2,
            "dropout_output": 0.1,
            "dropout_hidden": 0.1,
            "dropout_input": 0.1,
            "dropout_embedding": 0.0,
        },
        "epochs": 3,
        "batch_size": 8,
        "bptt": 20,
    },
}
# Per optimizer and preset. `cpu`: the best of the seed-1 sweep in docs/RESULTS.md
# (results/cpu/sweeps/ptb_lr): SGD 30 of 10/30/60 (the recipe's rate, no momentum),
# SoftAdam 120 of 10/30/60/120/250, Adam 1e-2 of 1e-3/3e-3/1e-2/3e-2. `demo`: the best
# of its own seed-1 sweep (results/demo/sweeps/ptb_lr): SGD 30 of 30/60/120, SoftAdam
# 120 of 30/60/120/250, Adam 3e-2 of 3e-3/1e-2/3e-2/1e-1. The others are
# not tuned on their models (no GPU for `paper`): SGD keeps the recipe's 30;
# SoftAdam's dampened momentum moves about lr per unit of steady gradient, like plain
# SGD, hence the same starting rate; Adam 3e-3 sits between the demo probe's best
# (1e-2, an unregularized LSTM) and the 1e-3 commonly used for AWD-LSTM.
LEARNING_RATES = {
    "softadam": {"paper": 30.0, "cpu": 120.0, "demo": 120.0, "tiny": 30.0},
    "sgd": {"paper": 30.0, "cpu": 30.0, "demo": 30.0, "tiny": 30.0},
    "adam": {"paper": 3e-3, "cpu": 1e-2, "demo": 3e-2, "tiny": 1e-2},
    "adamw": {"paper": 3e-3, "cpu": 3e-3, "demo": 3e-3, "tiny": 1e-2},
}
SOFTADAM_WEIGHT_DROP = 0.6  # the paper's one change to the recipe for SoftAdam
VALID_BATCH, TEST_BATCH = 10, 1  # the recipe's evaluation batch sizes


def load_text(files: dict[str, Path]) -> DatasetDict:
    return load_dataset("text", data_files={split: str(path) for split, path in files.items()})


def word_tokenizer(train_lines: list[str]) -> PreTrainedTokenizerFast:
    """Word-level vocabulary of the training text, <eos> first (id 0)."""
    vocab = {EOS: 0}
    for line in train_lines:
        for word in line.split():
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def token_streams(raw: DatasetDict, tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """Each split as one id stream, every line ending with <eos> (Mikolov's convention).
    Empty lines are skipped, as the recipe's reader does not see them in PTB."""
    eos = tokenizer.eos_token_id
    streams = {}
    for split in raw:
        lines = [line for line in raw[split]["text"] if line.strip()]
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        streams[split] = torch.tensor(list(chain.from_iterable(seq + [eos] for seq in ids)), dtype=torch.long)
    return streams


# Defaults of the model-specific options, filled in after parsing (so that an option given
# for the other model can be told from a default). awd_lstm's others come from --preset.
GROUP_DEFAULTS = {
    "preset": "cpu",
    "force": False,
    "dry_run": False,
    "block_size": 70,
    "hidden_size": 256,
    "layers": 2,
    "heads": 4,
    "dropout": 0.2,
    "max_steps": 2000,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None, help="folder with ptb.{train,valid,test}.txt")
    p.add_argument(
        "--hub-dataset",
        nargs="?",
        const=PTB_HUB_DATASET,
        default=None,
        metavar="NAME",
        help=f"load PTB from the Hugging Face hub instead of files (default name: {PTB_HUB_DATASET})",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the PTB md5 check (other text in the PTB layout)")
    p.add_argument("--model", choices=("awd_lstm", "gpt2"), default="awd_lstm")
    p.add_argument("--seed", type=int, default=1)
    add_optimizer_arguments(p, lr=None, weight_decay=1.2e-6, momentum=None, lr_scheduler=None)
    p.add_argument("--max-grad-norm", type=float, default=0.25, help="0: no clipping")
    p.add_argument("--output-dir", type=Path, default=None, help="checkpoints and logs (default: runs/ptb/...)")
    add_deepspeed_argument(p)
    awd = p.add_argument_group("awd_lstm (defaults from --preset)")
    awd.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu")
    awd.add_argument("--epochs", type=int, default=None)
    awd.add_argument("--bptt", type=int, default=None)
    awd.add_argument(
        "--weight-drop",
        type=float,
        default=None,
        help=f"default: the recipe's 0.5, {SOFTADAM_WEIGHT_DROP} for SoftAdam",
    )
    awd.add_argument(
        "--results",
        type=Path,
        default=None,
        help="folder for the run's record (default: runs/results/<preset>/ptb; results/ holds the committed ones)",
    )
    awd.add_argument("--force", action="store_true", default=None, help="rerun even if the record exists")
    awd.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="print the run's Trainer arguments (checked by transformers' parser) and optimizer; train nothing",
    )
    gpt2 = p.add_argument_group("gpt2")
    gpt2.add_argument("--block-size", type=int, default=None, help="tokens per training sequence (default: 70)")
    gpt2.add_argument("--hidden-size", type=int, default=None, help="default: 256")
    gpt2.add_argument("--layers", type=int, default=None, help="default: 2")
    gpt2.add_argument("--heads", type=int, default=None, help="default: 4")
    gpt2.add_argument("--dropout", type=float, default=None, help="default: 0.2")
    gpt2.add_argument("--max-steps", type=int, default=None, help="default: 2000 (awd_lstm trains for --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="training streams (awd_lstm) or blocks (gpt2)")
    args = p.parse_args(normalize_trainer_spellings(sys.argv[1:] if argv is None else argv, p))
    # An option of the other model's group would be silently ignored: refuse it.
    other, other_model = (gpt2, "gpt2") if args.model == "awd_lstm" else (awd, "awd_lstm")
    given = [a.option_strings[0] for a in other._group_actions if getattr(args, a.dest) is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        p.error(f"{', '.join(given)} {verb} to --model {other_model} only, not --model {args.model}")
    for action in (*awd._group_actions, *gpt2._group_actions):
        if action.dest in GROUP_DEFAULTS and getattr(args, action.dest) is None:
            setattr(args, action.dest, GROUP_DEFAULTS[action.dest])
    if args.model == "awd_lstm":
        preset = PRESETS[args.preset]
        args.epochs = args.epochs or preset["epochs"]
        args.bptt = args.bptt or preset["bptt"]
        args.batch_size = args.batch_size or preset["batch_size"]
        if args.lr is None:
            args.lr = LEARNING_RATES[args.optimizer][args.preset]
        if args.weight_drop is None:
            args.weight_drop = SOFTADAM_WEIGHT_DROP if args.optimizer == "softadam" else 0.5
        if args.momentum is None:
            args.momentum = 0.0  # the recipe's SGD
        args.lr_scheduler = args.lr_scheduler or "step"  # x0.1 at 50% and 75% of training
        if args.epochs < 1 or args.bptt < 2 or args.batch_size < 1:
            p.error("--epochs, --batch-size must be >= 1 and --bptt >= 2")
        args.output_dir = args.output_dir or Path("runs/ptb") / args.preset / f"{args.optimizer}-seed{args.seed}"
    else:
        args.batch_size = args.batch_size or 20
        args.lr = 1.0 if args.lr is None else args.lr
        args.momentum = 0.9 if args.momentum is None else args.momentum
        args.lr_scheduler = args.lr_scheduler or "linear"
        args.output_dir = args.output_dir or Path("runs/hf-lm")
        if args.max_steps < 1 or args.block_size < 2:
            p.error("--max-steps must be >= 1 and --block-size >= 2")
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    eta_schedule_error = eta_schedule_cli_error(args.optimizer, args.eta_schedule, args.eta_end)
    if eta_schedule_error:
        p.error(eta_schedule_error)
    deepspeed_error = deepspeed_cli_error(args)
    if deepspeed_error:
        p.error(deepspeed_error)
    return args


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=trainer_schedule_name(args),
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to=available_reporters(),
        deepspeed=str(args.deepspeed) if args.deepspeed else None,
        **overrides,
    )


def epoch_curve(log_history: list[dict]) -> list[dict]:
    """Per epoch: validation loss/ppl, mean logged training loss, cumulative wall seconds."""
    curve = []
    for entry in log_history:
        if "eval_ppl" in entry:
            epoch = round(entry["epoch"])
            losses = [e["loss"] for e in log_history if "loss" in e and epoch - 1 < e.get("epoch", -1) <= epoch]
            curve.append(
                {
                    "epoch": epoch,
                    "valid_loss": entry["eval_loss"],
                    "valid_ppl": entry["eval_ppl"],
                    "train_loss": sum(losses) / len(losses) if losses else None,
                    "wall_seconds": entry.get("eval_train_seconds"),
                }
            )
    return curve


def awd_lstm_setup(
    args: argparse.Namespace, streams: dict[str, torch.Tensor], vocab_size: int
) -> tuple[AWDLSTMForLanguageModeling, TrainingArguments, int]:
    """The model, the Trainer's arguments and the number of optimizer steps of a run."""
    torch.manual_seed(args.seed)
    config = AWDLSTMConfig(vocab_size=vocab_size, weight_drop=args.weight_drop, **PRESETS[args.preset]["model"])
    model = AWDLSTMForLanguageModeling(config)
    steps_per_epoch = segments_per_epoch(streams["train"], args.batch_size, args.bptt)
    training_args = training_arguments(
        args,
        num_train_epochs=args.epochs,
        per_device_eval_batch_size=VALID_BATCH,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, steps_per_epoch // 10),
    )
    return model, training_args, steps_per_epoch * args.epochs


def awd_settings(args: argparse.Namespace, model: AWDLSTMForLanguageModeling, num_training_steps: int) -> dict:
    """What makes a run this run: the record's "config", compared with an existing record's."""
    return {
        "lr": args.lr,
        "eta": args.eta if args.optimizer == "softadam" else None,
        "eta_schedule": args.eta_schedule if args.optimizer == "softadam" else None,
        "eta_end": args.eta_end,
        "momentum": args.momentum if args.optimizer == "sgd" else None,
        "weight_decay": args.weight_decay,
        "lr_scheduler": args.lr_scheduler,
        "warmup_steps": args.warmup_steps,
        "epochs": args.epochs,
        "bptt": args.bptt,
        "batch_size": args.batch_size,
        "max_grad_norm": args.max_grad_norm,
        "steps": num_training_steps,
        "model": model.config.to_diff_dict(),
    }


def comparable_settings(config: dict) -> dict:
    """A record's "config" for comparison: the model's fields one by one (Trainer adds some,
    such as its dtype, when it saves the model), without the transformers version."""
    flat = {k: v for k, v in config.items() if k not in ("model", "flush_denormals")}
    for key, value in (config.get("model") or {}).items():
        if key != "transformers_version":
            flat[f"model.{key}"] = value
    return flat


def awd_record_path(args: argparse.Namespace) -> Path:
    return record_path(args.results or default_results(args.preset, "ptb"), args.optimizer, args.seed)


def dry_run(args: argparse.Namespace, streams: dict[str, torch.Tensor], vocab_size: int, argv: list[str]) -> int:
    """Print what a run would do, its TrainingArguments as flags that the installed
    transformers' parser has accepted, and build (not step) its optimizer and schedule."""
    import transformers

    model, training_args, num_training_steps = awd_lstm_setup(args, streams, vocab_size)
    try:
        flags = training_arguments_cli(training_args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(shlex.join(["python", "hf_examples/run_language_modeling.py", *argv]))
    print(f"# TrainingArguments, accepted by transformers {transformers.__version__}'s HfArgumentParser:")
    print(shlex.join(flags))
    if training_args.deepspeed:  # Trainer builds the optimizer itself there
        cls, kwargs = trainer_optimizer_arguments(args, model, training_args)["optimizer_cls_and_kwargs"]
        print(
            f"# optimizer {cls.__name__} {kwargs}, given to Trainer as optimizer_cls_and_kwargs (DeepSpeed); "
            f"schedule {args.lr_scheduler}, warmup {args.warmup_steps}"
        )
    else:
        optimizer, scheduler = optimizers_from_cli(args, model, training_args, num_training_steps)
        hyper = {k: v for k, v in optimizer.defaults.items() if k in ("lr", "eta", "betas", "momentum", "nesterov")}
        hyper["weight_decay per group"] = [group["weight_decay"] for group in optimizer.param_groups]
        print(
            f"# optimizer {type(optimizer).__name__} {hyper}; schedule {args.lr_scheduler}, "
            f"warmup {args.warmup_steps}; lr at step 0: {scheduler.get_last_lr()[0]:g}"
        )
    print(f"# model {model.config.to_diff_dict()} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    print(
        f"# {num_training_steps:,} optimizer steps ({args.epochs} epochs, batch {args.batch_size}, bptt {args.bptt}); "
        f"record -> {awd_record_path(args)}"
    )
    return 0


def train_awd_lstm(
    args: argparse.Namespace,
    streams: dict[str, torch.Tensor],
    setup: tuple[AWDLSTMForLanguageModeling, TrainingArguments, int],
    argv: list[str],
) -> int:
    path = awd_record_path(args)
    if args.force and args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    model, training_args, num_training_steps = setup
    trainer = BPTTTrainer(
        model=model,
        args=training_args,
        train_tokens=streams["train"],
        eval_tokens=streams["valid"],
        bptt=args.bptt,
        **trainer_optimizer_arguments(args, model, training_args, num_training_steps),
    )
    last, incomplete = last_complete_checkpoint(args.output_dir)
    for folder in incomplete:
        print(f"removed {folder}: incomplete (the run stopped while saving it)", flush=True)
    if last:
        print(f"resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    started = time.time()
    # The best epoch's weights are loaded (load_best_model_at_end); evaluate them as the recipe does.
    valid = evaluate_stream(trainer.model, streams["valid"], VALID_BATCH, args.bptt)
    test = evaluate_stream(trainer.model, streams["test"], TEST_BATCH, args.bptt)
    curve = epoch_curve(trainer.state.log_history)
    record = {
        "experiment": "ptb",
        "preset": args.preset,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "command": [sys.executable, "hf_examples/run_language_modeling.py", *argv],
        "config": {**awd_settings(args, model, num_training_steps), "flush_denormals": args.flush_denormals},
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": curve,
        "train_curve": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
        "best_epoch": min(curve, key=lambda e: e["valid_loss"])["epoch"] if curve else None,
        "valid_loss": valid["loss"],
        "valid_ppl": valid["ppl"],
        "test_loss": test["loss"],
        "test_ppl": test["ppl"],
        "data": args.data_source,
        "tokens": {split: int(s.numel()) for split, s in streams.items()},
        "train_seconds": curve[-1]["wall_seconds"] if curve else None,
        "eval_seconds": time.time() - started,
    }
    write_record(path, record)
    trainer.save_model(str(args.output_dir / "best"))
    print(f"{args.optimizer}-seed{args.seed}: valid ppl {valid['ppl']:.2f}, test ppl {test['ppl']:.2f} -> {path}")
    return 0


def train_gpt2(args: argparse.Namespace, streams: dict[str, torch.Tensor], vocab_size: int) -> int:
    def blocks(stream: torch.Tensor) -> list[dict]:
        n = stream.numel() // args.block_size * args.block_size
        return [{"input_ids": b, "labels": b} for b in stream[:n].view(-1, args.block_size)]

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.block_size,
        n_embd=args.hidden_size,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    training_args = training_arguments(
        args,
        max_steps=args.max_steps,
        per_device_eval_batch_size=args.batch_size,
        save_strategy="steps",
        save_steps=args.max_steps,
        save_total_limit=2,
        logging_steps=max(1, min(50, args.max_steps // 10)),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks(streams["train"]),
        data_collator=default_data_collator,
        **trainer_optimizer_arguments(args, model, training_args),
    )
    last, _ = last_complete_checkpoint(args.output_dir)
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    metrics = {"optimizer": args.optimizer, "model": args.model}
    for split in ("valid", "test"):
        loss = trainer.evaluate(blocks(streams[split]), metric_key_prefix=split)[f"{split}_loss"]
        metrics[f"{split}_loss"], metrics[f"{split}_ppl"] = loss, math.exp(min(loss, 50.0))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"valid ppl {metrics['valid_ppl']:.2f}  test ppl {metrics['test_ppl']:.2f}"
        f"  -> {args.output_dir / 'metrics.json'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.hub_dataset and args.data_dir:
        print("error: give --data-dir or --hub-dataset, not both", file=sys.stderr)
        return 2
    try:
        if args.hub_dataset:
            raw, args.data_source = load_ptb_hub(args.hub_dataset, verify=not args.no_verify), args.hub_dataset
        else:
            files = ptb_files(args.data_dir, verify=not args.no_verify)  # a wrong or missing copy fails either way
            raw, args.data_source = load_text(files), str(files["train"].parent)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = word_tokenizer(raw["train"]["text"])
    streams = token_streams(raw, tokenizer)
    print(
        f"PTB from {args.data_source}: vocabulary {len(tokenizer):,}, tokens "
        + " / ".join(f"{split} {s.numel():,}" for split, s in streams.items()),
        flush=True,
    )
    if args.model == "awd_lstm" and args.dry_run:
        return dry_run(args, streams, len(tokenizer), argv)
    if args.model == "awd_lstm":
        # The run has finished only if a record of these very settings exists (the model and
        # the step count come from the data, hence after tokenizing).
        setup = awd_lstm_setup(args, streams, len(tokenizer))
        try:
            finished = not args.force and finished_with_settings(
                awd_record_path(args),
                comparable_settings(awd_settings(args, setup[0], setup[2])),
                lambda record: comparable_settings(record.get("config", {})),
            )
        except RecordConflict as conflict:
            print(f"error: {conflict}", file=sys.stderr)
            return 2
        if finished:
            print(f"{awd_record_path(args)}: this run has finished (same settings): skipping (--force reruns)")
            return 0
    with flush_denormals() as args.flush_denormals:  # a diverging sweep cell runs 6x slower without
        if args.model == "awd_lstm":
            return train_awd_lstm(args, streams, setup, argv)
        return train_gpt2(args, streams, len(tokenizer))


if __name__ == "__main__":
    sys.exit(main())
