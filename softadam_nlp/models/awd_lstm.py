"""AWD-LSTM (Merity, Keskar and Socher 2017, "Regularizing and Optimizing LSTM Language
Models") as a transformers `PreTrainedModel`, for the paper's Table 2.

Embedding 400, three LSTM layers (1150, 1150, 400), decoder tied to the embedding, and
the recipe's regularizers:

- weight drop: DropConnect on each layer's hidden-to-hidden matrix, one mask per forward
  call (so per BPTT segment), applied with `torch.func.functional_call` on a stock
  `nn.LSTM`: the raw weight stays the trained parameter, the dropped copy is what the
  LSTM multiplies by, and nothing is deleted or re-registered behind torch's back;
- embedding dropout: whole words of the vocabulary dropped (rows of the embedding);
- locked (variational) dropout: one mask per sequence, shared over time, on the
  embedding output (`dropout_input`), between LSTM layers (`dropout_hidden`) and on
  the last layer's output (`dropout_output`);
- activation regularization `alpha * mean(h_drop^2)` and temporal activation
  regularization `beta * mean((h_t - h_{t-1})^2)` on the last layer, added to the
  training loss only.

Tensors are batch-first, `(batch, time)`. `labels` are the next tokens aligned with
`input_ids` (`labels[:, t]` follows `input_ids[:, t]`), not shifted inside the model:
a stream cut into consecutive segments then predicts every token exactly once.
The returned `hidden` is detached, ready to be passed to the next segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

Hidden = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (h, c), each (1, batch, size)


class AWDLSTMConfig(PretrainedConfig):
    """Defaults are the AWD-LSTM PTB recipe (weight drop 0.5; the paper uses 0.6 for SoftAdam)."""

    model_type = "awd_lstm"

    def __init__(
        self,
        vocab_size: int = 10_000,
        embedding_size: int = 400,
        hidden_size: int = 1150,
        num_layers: int = 3,
        dropout_output: float = 0.4,
        dropout_hidden: float = 0.25,
        dropout_input: float = 0.4,
        dropout_embedding: float = 0.1,
        weight_drop: float = 0.5,
        alpha: float = 2.0,
        beta: float = 1.0,
        init_range: float = 0.1,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        for name, p in (
            ("dropout_output", dropout_output),
            ("dropout_hidden", dropout_hidden),
            ("dropout_input", dropout_input),
            ("dropout_embedding", dropout_embedding),
            ("weight_drop", weight_drop),
        ):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"Invalid {name}={p}: a dropout probability must be in [0, 1)")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers={num_layers}: must be >= 1")
        if alpha < 0 or beta < 0:
            raise ValueError(f"Invalid alpha={alpha}, beta={beta}: must be >= 0")
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout_output = dropout_output
        self.dropout_hidden = dropout_hidden
        self.dropout_input = dropout_input
        self.dropout_embedding = dropout_embedding
        self.weight_drop = weight_drop
        self.alpha = alpha
        self.beta = beta
        self.init_range = init_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


@dataclass
class AWDLSTMOutput(ModelOutput):
    """`loss` is cross-entropy + AR + TAR in training, cross-entropy in eval;
    `cross_entropy` is the mean per-token negative log-likelihood alone."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden: Optional[Hidden] = None
    cross_entropy: Optional[torch.Tensor] = None


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared over time: x is (batch, time, features)."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(embedding: nn.Embedding, input_ids: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole words: every occurrence of a dropped word embeds to zero."""
    weight = embedding.weight
    if training and p > 0.0:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
        weight = weight * mask
    return F.embedding(input_ids, weight, embedding.padding_idx)


class WeightDropLSTM(nn.Module):
    """One `nn.LSTM` layer whose hidden-to-hidden weight is DropConnect-ed in training."""

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.weight_drop = weight_drop

    def dropped_weight(self) -> torch.Tensor:
        """The hidden-to-hidden matrix this forward multiplies by (a fresh mask each call in training)."""
        return F.dropout(self.lstm.weight_hh_l0, self.weight_drop, self.training)

    def forward(self, x: torch.Tensor, state: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        if not self.training or self.weight_drop == 0.0:
            return self.lstm(x, state)
        return functional_call(self.lstm, {"weight_hh_l0": self.dropped_weight()}, (x, state))


class AWDLSTMForLanguageModeling(PreTrainedModel):
    config_class = AWDLSTMConfig
    base_model_prefix = "awd_lstm"
    main_input_name = "input_ids"
    _tied_weights_keys = {"decoder.weight": "embedding.weight"}

    def __init__(self, config: AWDLSTMConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        sizes = [config.embedding_size] + [config.hidden_size] * (config.num_layers - 1)
        # The last layer's size matches the embedding, so the decoder can share its weight.
        last = config.embedding_size if config.tie_word_embeddings else config.hidden_size
        outputs = sizes[1:] + [last]
        self.layers = nn.ModuleList(WeightDropLSTM(i, o, config.weight_drop) for i, o in zip(sizes, outputs))
        self.decoder = nn.Linear(outputs[-1], config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Merity et al.: embedding U(-0.1, 0.1), decoder bias 0; LSTMs keep torch's default.
        if module is getattr(self, "embedding", None):
            nn.init.uniform_(module.weight, -self.config.init_range, self.config.init_range)
        elif module is getattr(self, "decoder", None):
            nn.init.zeros_(module.bias)
            if not self.config.tie_word_embeddings:
                nn.init.uniform_(module.weight, -self.config.init_range, self.config.init_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero state for `batch_size` streams."""
        weight = self.decoder.weight
        return tuple(
            (
                weight.new_zeros(1, batch_size, layer.lstm.hidden_size),
                weight.new_zeros(1, batch_size, layer.lstm.hidden_size),
            )
            for layer in self.layers
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        hidden: Optional[Hidden] = None,
        **kwargs,
    ) -> AWDLSTMOutput:
        config = self.config
        if hidden is None:
            hidden = self.init_hidden(input_ids.size(0))
        x = embedding_dropout(self.embedding, input_ids, config.dropout_embedding, self.training)
        x = locked_dropout(x, config.dropout_input, self.training)
        new_hidden = []
        raw_output = x
        for index, (layer, state) in enumerate(zip(self.layers, hidden)):
            raw_output, (h, c) = layer(x, state)
            new_hidden.append((h.detach(), c.detach()))
            last = index == len(self.layers) - 1
            x = locked_dropout(raw_output, config.dropout_output if last else config.dropout_hidden, self.training)
        logits = self.decoder(x)

        loss = cross_entropy = None
        if labels is not None:
            cross_entropy = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
            loss = cross_entropy
            if self.training:
                # AR on the dropped output of the last layer, TAR on its raw output (as in the recipe).
                if config.alpha:
                    loss = loss + config.alpha * x.pow(2).mean()
                if config.beta and raw_output.size(1) > 1:
                    loss = loss + config.beta * (raw_output[:, 1:] - raw_output[:, :-1]).pow(2).mean()
        return AWDLSTMOutput(loss=loss, logits=logits, hidden=tuple(new_hidden), cross_entropy=cross_entropy)
