#!/usr/bin/env python
r"""Train an encoder-decoder transformer from scratch with Seq2SeqTrainer and SoftAdam.

No pretrained weights and no downloads: the tokenizer (joint BPE) is trained here with
the `tokenizers` library on the training text, the model is a MarianMT-architecture
transformer built from a config (defaults sized like fairseq's
transformer_iwslt_de_en), and evaluation decodes with beam search and scores BLEU with
sacrebleu.

    python hf_examples/run_translation.py --data-dir DIR --src-lang de --tgt-lang en \
        --optimizer softadam --lr 0.5 --max-steps 20000 --output-dir runs/hf-translation

reads DIR/{train,valid}.{de,en} (one sentence per line, as the IWSLT'14 preparation
writes them); --train-src/--train-tgt/--valid-src/--valid-tgt take any files instead,
gzipped ones too (Multi30k's train.de.gz, val.de.gz, ...). Metrics go to
OUTPUT_DIR/metrics.json; --step-times FILE also writes when each optimizer step ended
(for timing: scripts/gpu_check.py). TrainingArguments' own spellings are accepted
too (--learning_rate, --max_steps, --per_device_train_batch_size, --output_dir, ..., and
every option with underscores for dashes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DataCollatorForSeq2Seq,
    MarianConfig,
    MarianMTModel,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)

from softadam_nlp.hf import (
    add_deepspeed_argument,
    add_optimizer_arguments,
    available_reporters,
    deepspeed_cli_error,
    normalize_trainer_spellings,
    trainer_optimizer_arguments,
    trainer_schedule_name,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def read_lines(path: Path, limit: int | None = None) -> list[str]:
    """One sentence per line, from a plain or a gzipped (.gz) text file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    lines = [line.strip() for line in text.splitlines()]
    return lines[:limit] if limit else lines


def encode_pairs(
    tokenizer: PreTrainedTokenizerFast, src: list[str], tgt: list[str], max_length: int
) -> list[dict[str, list[int]]]:
    """One example per sentence pair (input_ids, attention_mask, labels): a plain list, which
    Trainer takes as a dataset, so that no `datasets` install is needed (the GPU machine has none)."""
    batch = tokenizer(src, text_target=tgt, max_length=max_length, truncation=True)
    return [dict(zip(batch.keys(), example)) for example in zip(*batch.values())]


class StepTimes(TrainerCallback):
    """The wall time at the end of every optimizer step, written to `path` as JSON when
    training ends; on CUDA after a synchronization, so that a step's kernels are counted."""

    def __init__(self, path: Path, details: dict) -> None:
        self.path, self.details, self.times = path, details, []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        start = self.times[0] if self.times else 0.0
        record = {**self.details, "step_end_seconds": [t - start for t in self.times]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=2) + "\n")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A joint BPE tokenizer over source and target training text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    # SentencePiece-style word boundaries (▁) so that decoding restores the spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=args.d_model,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        encoder_attention_heads=args.heads,
        decoder_attention_heads=args.heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        dropout=args.dropout,
        max_position_embeddings=args.max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
    )
    return MarianMTModel(config)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, help="folder with {train,valid}.{SRC,TGT}")
    data.add_argument("--src-lang", default="de")
    data.add_argument("--tgt-lang", default="en")
    for split in ("train", "valid"):
        data.add_argument(f"--{split}-src", type=Path)
        data.add_argument(f"--{split}-tgt", type=Path)
    data.add_argument("--max-train-samples", type=int, default=None)
    data.add_argument("--max-eval-samples", type=int, default=None)
    data.add_argument("--max-length", type=int, default=256, help="tokens per sentence (longer are cut)")
    model = p.add_argument_group("model (defaults: transformer_iwslt_de_en sizes)")
    model.add_argument("--vocab-size", type=int, default=10000)
    model.add_argument("--d-model", type=int, default=512)
    model.add_argument("--layers", type=int, default=6)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--ffn-dim", type=int, default=1024)
    model.add_argument("--dropout", type=float, default=0.3)
    add_optimizer_arguments(p, lr=0.5, weight_decay=1e-4)
    train = p.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--max-grad-norm", type=float, default=0.0, help="0: no clipping")
    train.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: at the end)")
    train.add_argument("--beams", type=int, default=5)
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--output-dir", type=Path, default=Path("runs/hf-translation"))
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    train.add_argument(
        "--step-times",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the end time of every optimizer step (and the batch's mean token counts) to this JSON file",
    )
    add_deepspeed_argument(train)
    args = p.parse_args(normalize_trainer_spellings(sys.argv[1:] if argv is None else argv, p))
    if args.data_dir:
        for split in ("train", "valid"):
            setattr(args, f"{split}_src", getattr(args, f"{split}_src") or args.data_dir / f"{split}.{args.src_lang}")
            setattr(args, f"{split}_tgt", getattr(args, f"{split}_tgt") or args.data_dir / f"{split}.{args.tgt_lang}")
    missing = [
        f"--{s}" for s in ("train-src", "train-tgt", "valid-src", "valid-tgt") if not getattr(args, s.replace("-", "_"))
    ]
    if missing:
        p.error(f"give --data-dir or all of {', '.join(missing)}")
    if args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    deepspeed_error = deepspeed_cli_error(args)
    if deepspeed_error:
        p.error(deepspeed_error)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train_src, train_tgt = (
            read_lines(args.train_src, args.max_train_samples),
            read_lines(args.train_tgt, args.max_train_samples),
        )
        valid_src, valid_tgt = (
            read_lines(args.valid_src, args.max_eval_samples),
            read_lines(args.valid_tgt, args.max_eval_samples),
        )
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if len(train_src) != len(train_tgt) or len(valid_src) != len(valid_tgt):
        print("error: source and target files have different numbers of lines", file=sys.stderr)
        return 2

    tokenizer = train_tokenizer(train_src + train_tgt, args.vocab_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.output_dir / "tokenizer")

    train_set = encode_pairs(tokenizer, train_src, train_tgt, args.max_length)
    valid_set = encode_pairs(tokenizer, valid_src, valid_tgt, args.max_length)

    model = build_model(tokenizer, args)
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        lr_scheduler_type=trainer_schedule_name(args),
        warmup_steps=args.warmup_steps,
        label_smoothing_factor=args.label_smoothing,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps or args.max_steps,
        save_total_limit=2,
        logging_steps=max(1, min(50, args.max_steps // 10)),
        report_to=available_reporters(),
        predict_with_generate=True,
        generation_num_beams=args.beams,
        generation_max_length=args.max_length,
        deepspeed=str(args.deepspeed) if args.deepspeed else None,
    )
    optimizer_arguments = trainer_optimizer_arguments(args, model, training_args)

    def compute_metrics(prediction) -> dict[str, float]:
        predictions = np.where(prediction.predictions < 0, tokenizer.pad_token_id, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, tokenizer.pad_token_id, prediction.label_ids)
        hyps = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}

    callbacks = []
    if args.step_times:
        details = {
            "batch_size": args.batch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_pairs": len(train_set),
            "mean_source_tokens": sum(len(e["input_ids"]) for e in train_set) / len(train_set),
            "mean_target_tokens": sum(len(e["labels"]) for e in train_set) / len(train_set),
            "device": "cpu" if training_args.use_cpu else "cuda",
        }
        callbacks.append(StepTimes(args.step_times, details))
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=valid_set,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        **optimizer_arguments,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate(num_beams=args.beams, max_length=args.max_length)
    metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics["optimizer"] = args.optimizer
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(
        f"valid BLEU {metrics['eval_bleu']:.2f}  valid loss {metrics['eval_loss']:.3f} "
        f"(label-smoothed; ppl {metrics['eval_ppl']:.2f})  -> {args.output_dir / 'metrics.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
