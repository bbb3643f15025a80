#!/usr/bin/env python
r"""Train a causal language model from scratch with the Trainer and SoftAdam; report perplexity.

Text files in the PTB layout (DATA_DIR/ptb.{train,valid,test}.txt, one sentence per
line, already tokenized) are loaded with `datasets`; the vocabulary is the training
set's words plus <eos> (a word-level `tokenizers` model, so perplexities are per word
as in the PTB literature); lines are joined into one stream and cut into blocks.

    python hf_examples/run_language_modeling.py --data-dir ../shared/data/ptb \
        --model gpt2 --optimizer softadam --lr 1.0 --max-steps 2000

Models come from MODEL_BUILDERS (name -> function(vocab_size, args) -> model); the
AWD-LSTM joins it with the PTB experiment. Metrics go to OUTPUT_DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from itertools import chain
from pathlib import Path
from typing import Callable

import torch
from datasets import DatasetDict, load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer, TrainingArguments, default_data_collator

from softadam_nlp.hf import add_optimizer_arguments, available_reporters, optimizers_from_cli, trainer_schedule_name

EOS = "<eos>"


def build_gpt2(vocab_size: int, args: argparse.Namespace) -> torch.nn.Module:
    config = GPT2Config(vocab_size=vocab_size, n_positions=args.block_size, n_embd=args.hidden_size,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


MODEL_BUILDERS: dict[str, Callable[[int, argparse.Namespace], torch.nn.Module]] = {"gpt2": build_gpt2}


def load_text(data_dir: Path) -> DatasetDict:
    files = {split: data_dir / f"ptb.{split}.txt" for split in ("train", "valid", "test")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)} (expected the PTB layout ptb.{{train,valid,test}}.txt)")
    return load_dataset("text", data_files={k: str(v) for k, v in files.items()})


def word_tokenizer(train_lines: list[str]) -> PreTrainedTokenizerFast:
    """Word-level vocabulary of the training text, <eos> first (id 0)."""
    vocab = {EOS: 0}
    for line in train_lines:
        for word in line.split():
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="folder with ptb.{train,valid,test}.txt")
    p.add_argument("--model", choices=sorted(MODEL_BUILDERS), default="gpt2")
    p.add_argument("--block-size", type=int, default=70, help="tokens per training sequence")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.2)
    add_optimizer_arguments(p, lr=1.0, weight_decay=1.2e-6)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--max-grad-norm", type=float, default=0.25, help="0: no clipping")
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: at the end)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-dir", type=Path, default=Path("runs/hf-lm"))
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.block_size < 2:
        p.error("--max-steps must be >= 1 and --block-size >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        raw = load_text(args.data_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokenizer = word_tokenizer(raw["train"]["text"])
    eos = tokenizer.eos_token_id

    def to_ids(batch: dict) -> dict:
        return {"ids": [tokenizer(line.strip())["input_ids"] + [eos] for line in batch["text"]]}

    def to_blocks(batch: dict) -> dict:
        stream = list(chain.from_iterable(batch["ids"]))
        n = len(stream) // args.block_size * args.block_size
        blocks = [stream[i : i + args.block_size] for i in range(0, n, args.block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    ids = raw.map(to_ids, batched=True, remove_columns=["text"])
    # One map call over the whole split keeps the stream contiguous across lines.
    blocks = ids.map(to_blocks, batched=True, batch_size=None, remove_columns=["ids"])

    model = MODEL_BUILDERS[args.model](len(tokenizer), args)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type=trainer_schedule_name(args),
        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, seed=args.seed,
        use_cpu=not torch.cuda.is_available(), eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps, save_strategy="steps", save_steps=args.eval_steps or args.max_steps,
        save_total_limit=2, logging_steps=max(1, min(50, args.max_steps // 10)), report_to=available_reporters(),
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=blocks["train"], eval_dataset=blocks["valid"],
        data_collator=default_data_collator,
        optimizers=optimizers_from_cli(args, model, training_args),
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = {"optimizer": args.optimizer, "model": args.model}
    for split in ("valid", "test"):
        loss = trainer.evaluate(blocks[split], metric_key_prefix=split)[f"{split}_loss"]
        metrics[f"{split}_loss"], metrics[f"{split}_ppl"] = loss, math.exp(min(loss, 50.0))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"valid ppl {metrics['valid_ppl']:.2f}  test ppl {metrics['test_ppl']:.2f}  -> {args.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
