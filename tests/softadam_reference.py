"""An independent, literal transcription of SoftAdam's equations, for the tests only.

It shares no code with softadam_nlp: every quantity is computed out of place, in the
order the paper writes it, so that a mistake in the optimizer's in-place fused
arithmetic cannot be reproduced here by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceState:
    t: int = 0
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class ReferenceSoftAdam:
    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eta: float = 1.0
    weight_decay: float = 0.0
    nesterov: bool = False
    state: dict[int, ReferenceState] = field(default_factory=dict)

    def step(self, index: int, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Return the new value of parameter ``index`` (``p`` and ``g`` are not modified)."""
        s = self.state.setdefault(index, ReferenceState())
        if s.m is None:
            s.m = torch.zeros_like(p)
            s.v = torch.zeros_like(p)
        s.t += 1
        b1, b2, eta = self.beta1, self.beta2, self.eta
        s.m = b1 * s.m + (1 - b1) * g
        b2t = min(b2, 1 - 1 / s.t)
        s.v = b2t * s.v + (1 - b2t) * g * g
        vbar = s.v.mean()
        gamma = math.sqrt((1 - b2) / (1 - b2t))
        d = 1 + eta - eta * gamma + eta * gamma * torch.sqrt(s.v / (vbar + self.eps**2))
        p = p - self.lr * self.weight_decay * p
        numerator = b1 * s.m + (1 - b1) * g if self.nesterov else s.m
        return p - self.lr * (1 + eta) * numerator / d
