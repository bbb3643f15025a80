"""AWD-LSTM model and the BPTT training/evaluation logic (softadam_nlp.models.awd_lstm,
softadam_nlp.experiments.bptt)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from softadam_nlp.experiments.bptt import (
    BPTTSegments,
    BPTTTrainer,
    batchify_streams,
    draw_segment_length,
    epoch_segment_lengths,
    evaluate_stream,
    segment_count,
)
from softadam_nlp.models.awd_lstm import (
    AWDLSTMConfig,
    AWDLSTMForLanguageModeling,
    WeightDropLSTM,
    embedding_dropout,
    locked_dropout,
)

NO_DROPOUT = {
    "dropout_output": 0.0,
    "dropout_hidden": 0.0,
    "dropout_input": 0.0,
    "dropout_embedding": 0.0,
    "weight_drop": 0.0,
}


def small_model(**overrides) -> AWDLSTMForLanguageModeling:
    torch.manual_seed(0)
    config = dict(vocab_size=23, embedding_size=6, hidden_size=10, num_layers=3)
    config.update(overrides)
    return AWDLSTMForLanguageModeling(AWDLSTMConfig(**config))


# --- model -------------------------------------------------------------------------


def test_shapes_sizes_and_tied_embedding() -> None:
    model = small_model()
    x = torch.randint(0, 23, (4, 9))
    out = model(x, labels=x)
    assert out.logits.shape == (4, 9, 23)
    assert model.decoder.weight is model.embedding.weight
    assert [layer.lstm.hidden_size for layer in model.layers] == [10, 10, 6]  # last = embedding size
    assert [layer.lstm.input_size for layer in model.layers] == [6, 10, 10]
    assert [tuple(h.shape) for h, _ in out.hidden] == [(1, 4, 10), (1, 4, 10), (1, 4, 6)]
    # The paper's model: 400/1150/3 layers on PTB's 10k words is the recipe's 24M parameters.
    full = AWDLSTMForLanguageModeling(AWDLSTMConfig(vocab_size=10_000))
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(24.2e6, rel=0.01)


def test_save_and_load_pretrained_keep_weights_and_tie(tmp_path) -> None:
    model = small_model(weight_drop=0.6).eval()
    model.save_pretrained(tmp_path)
    loaded = AWDLSTMForLanguageModeling.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 23, (2, 7))
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.decoder.weight is loaded.embedding.weight and loaded.config.weight_drop == 0.6


def test_trainers_best_model_reload_restores_the_tied_decoder(tmp_path) -> None:
    # Trainer's load_best_model_at_end reads the saved weights with strict=False and warns
    # "missing keys ... ['decoder.weight']": the tied decoder is saved once, as the embedding.
    # Loading the embedding must bring the decoder with it.
    from safetensors.torch import load_file

    model = small_model().eval()
    model.save_pretrained(tmp_path)
    other = small_model().eval()
    with torch.no_grad():  # small_model seeds itself: make every weight differ
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter))
    assert not torch.equal(other.embedding.weight, model.embedding.weight)
    result = other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert result.missing_keys == ["decoder.weight"] and not result.unexpected_keys
    x = torch.randint(0, 23, (2, 7))
    assert other.decoder.weight is other.embedding.weight and torch.equal(model(x).logits, other(x).logits)


@pytest.mark.parametrize(
    "field, value", [("weight_drop", 1.0), ("dropout_input", -0.1), ("num_layers", 0), ("alpha", -1)]
)
def test_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        AWDLSTMConfig(**{field: value})


def test_weight_drop_masks_change_each_training_call_and_vanish_in_eval() -> None:
    layer = WeightDropLSTM(5, 40, weight_drop=0.5)
    raw = layer.lstm.weight_hh_l0
    first, second = layer.dropped_weight(), layer.dropped_weight()
    assert not torch.equal(first == 0, second == 0)  # a fresh mask per call
    kept = first != 0
    assert 0.4 < 1 - kept.float().mean().item() < 0.6
    assert torch.allclose(first[kept], raw[kept] / 0.5)  # inverted-dropout scaling
    layer.eval()
    assert torch.equal(layer.dropped_weight(), raw)


def test_forward_uses_the_dropped_weight_and_trains_the_raw_one() -> None:
    layer = WeightDropLSTM(5, 8, weight_drop=0.5)
    x = torch.randn(3, 6, 5)
    torch.manual_seed(1)
    out, _ = layer(x)
    torch.manual_seed(1)
    dropped = layer.dropped_weight()
    plain = torch.nn.LSTM(5, 8, batch_first=True)
    plain.load_state_dict(layer.lstm.state_dict())
    with torch.no_grad():
        plain.weight_hh_l0.copy_(dropped)
    assert torch.allclose(out, plain(x)[0], atol=1e-6)
    assert not torch.allclose(layer(x)[0], out)  # another call, another mask
    out.sum().backward()
    assert layer.lstm.weight_hh_l0.grad is not None and layer.lstm.weight_hh_l0.grad.abs().sum() > 0
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0]) and torch.allclose(layer(x)[0], layer.lstm(x)[0])


def test_dropped_weight_changes_between_training_steps_not_in_eval() -> None:
    model = small_model(**{**NO_DROPOUT, "weight_drop": 0.5})
    x = torch.randint(0, 23, (2, 8))
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_locked_and_embedding_dropout_share_masks_over_time() -> None:
    x = torch.ones(4, 30, 12)
    dropped = locked_dropout(x, 0.5, training=True)
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # same mask at every step
    assert set(dropped.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(locked_dropout(x, 0.5, training=False), x)
    embedding = torch.nn.Embedding(5, 7)
    ids = torch.tensor([[1, 2, 1, 3, 1, 2]])
    out = embedding_dropout(embedding, ids, 0.5, training=True)
    assert torch.equal(out[0, 0], out[0, 2]) and torch.equal(out[0, 0], out[0, 4])  # a word is dropped everywhere
    for position in range(ids.size(1)):
        row = out[0, position]
        assert torch.equal(row, torch.zeros(7)) or torch.allclose(row, embedding.weight[ids[0, position]] / 0.5)


def test_hidden_state_carries_across_segments_and_is_detached() -> None:
    model = small_model().eval()
    x = torch.randint(0, 23, (3, 12))
    whole = model(x).logits
    first = model(x[:, :5])
    second = model(x[:, 5:], hidden=first.hidden)
    assert torch.allclose(torch.cat([first.logits, second.logits], 1), whole, atol=1e-6)
    assert not torch.allclose(model(x[:, 5:]).logits, whole[:, 5:])  # a fresh state differs
    model.train()
    out = model(x, labels=x)
    assert all(not h.requires_grad and not c.requires_grad for h, c in out.hidden)


def test_ar_and_tar_terms_only_in_training() -> None:
    model = small_model(**NO_DROPOUT, alpha=2.0, beta=1.0)
    x, y = torch.randint(0, 23, (2, 9)), torch.randint(0, 23, (2, 9))
    out = model(x, labels=y)
    h = model.embedding(x)
    for layer in model.layers:
        h, _ = layer.lstm(h)
    expected_ce = F.cross_entropy(model.decoder(h).reshape(-1, 23), y.reshape(-1))
    expected = expected_ce + 2.0 * h.pow(2).mean() + 1.0 * (h[:, 1:] - h[:, :-1]).pow(2).mean()
    assert torch.allclose(out.cross_entropy, expected_ce, atol=1e-6)
    assert torch.allclose(out.loss, expected, atol=1e-6) and out.loss > out.cross_entropy
    model.eval()
    out = model(x, labels=y)
    assert torch.equal(out.loss, out.cross_entropy)


# --- batching and BPTT -------------------------------------------------------------


def test_batchify_streams_by_hand() -> None:
    streams = batchify_streams(torch.arange(11), 3)
    assert streams.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # 9 and 10 dropped
    with pytest.raises(ValueError, match="too few"):
        batchify_streams(torch.arange(5), 3)


def test_segment_lengths_follow_the_recipe_and_cover_the_stream() -> None:
    rng = np.random.default_rng(0)
    drawn = np.array([draw_segment_length(rng, 70) for _ in range(20_000)])
    assert drawn.min() >= 5
    short = drawn < 52  # bptt/2 = 35 with std 5, far from 70
    assert 0.04 < short.mean() < 0.06
    assert abs(drawn[~short].mean() - 69.5) < 0.3 and abs(drawn[short].mean() - 34.5) < 0.5  # int() truncates
    assert segment_count(100, 10) == 10  # round(100 / (0.95 * 10 + 0.05 * 5)) = round(10.26)
    lengths = epoch_segment_lengths(46_000, 70, seed=1, epoch=0)
    assert sum(lengths) == 46_000 and len(lengths) == segment_count(46_000, 70) and min(lengths) >= 1
    assert lengths == epoch_segment_lengths(46_000, 70, seed=1, epoch=0)  # resumable
    other = epoch_segment_lengths(46_000, 70, seed=1, epoch=1)
    assert other != lengths and len(other) == len(lengths)  # same count every epoch


def test_segments_predict_every_token_once_in_order() -> None:
    tokens = torch.arange(203)
    segments = BPTTSegments(tokens, batch_size=4, bptt=7, seed=3)
    streams = batchify_streams(tokens, 4)
    for epoch in (0, 1):
        segments.set_epoch(epoch)
        items = [segments[i] for i in range(len(segments))]
        assert [item["segment"] for item in items] == list(range(len(segments)))
        assert torch.equal(torch.cat([i["input_ids"] for i in items], 1), streams[:, :-1])
        assert torch.equal(torch.cat([i["labels"] for i in items], 1), streams[:, 1:])
        assert all(i["input_ids"].shape[1] == i["seq_len"] for i in items)


def test_whole_split_evaluation_does_not_depend_on_bptt_when_the_state_is_carried() -> None:
    model = small_model().eval()
    tokens = torch.randint(0, 23, (301,))
    with torch.no_grad():
        logits = model(tokens[None, :-1]).logits[0]
    nll = F.cross_entropy(logits, tokens[1:]).item()
    for bptt in (7, 50, 300):
        result = evaluate_stream(model, tokens, batch_size=1, bptt=bptt)
        assert result["loss"] == pytest.approx(nll, rel=1e-5) and result["tokens"] == 300
        assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert evaluate_stream(model, tokens, batch_size=4, bptt=7)["tokens"] == 4 * 74


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that remembers the learning rate each step ran at."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_lrs: list[float] = []

    def step(self, closure=None):
        self.step_lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_trainer_scales_lr_by_segment_length_and_resets_state_each_epoch(tmp_path) -> None:
    model = small_model()
    seen: list[bool] = []  # per forward in training: did a hidden state come in?
    forward = model.forward

    def spy(*args, hidden=None, **kwargs):
        if model.training:
            seen.append(hidden is not None)
        return forward(*args, hidden=hidden, **kwargs)

    model.forward = spy
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=2,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        save_strategy="no",
        eval_strategy="epoch",
        report_to="none",
        use_cpu=True,
        logging_steps=5,
        max_grad_norm=0.0,
    )
    optimizer = RecordingSGD(model.parameters(), lr=0.5)
    tokens = torch.randint(0, 23, (400,))
    trainer = BPTTTrainer(
        model=model,
        args=args,
        train_tokens=tokens,
        eval_tokens=tokens[:100],
        bptt=10,
        optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)),
    )
    segments = trainer.train_segments
    expected_lrs = []
    for epoch in (0, 1):
        segments.set_epoch(epoch)
        expected_lrs += [0.5 * length / 10 for length in segments.lengths]
    trainer.train()
    assert optimizer.step_lrs == pytest.approx(expected_lrs)
    assert optimizer.param_groups[0]["lr"] == 0.5  # restored after every step
    per_epoch = len(segments)
    assert seen == ([False] + [True] * (per_epoch - 1)) * 2
    evals = [e for e in trainer.state.log_history if "eval_ppl" in e]
    assert [round(e["epoch"]) for e in evals] == [1, 2]
    assert all(e["eval_ppl"] == pytest.approx(math.exp(e["eval_loss"])) for e in evals)
    assert 0 < evals[0]["eval_train_seconds"] < evals[1]["eval_train_seconds"]
