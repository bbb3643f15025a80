"""Convergence within a fixed budget, against bounds derived from each problem.

Each test also runs a control that must miss the same bound, so a bound that any
optimizer would meet cannot pass unnoticed.
"""

from __future__ import annotations

import math

import pytest
import torch

from softadam_nlp import SoftAdam


def noisy_quadratic_final_loss(make_optimizer, steps: int, seed: int = 0) -> tuple[float, float]:
    """f(x) = 1/2 sum_i lam_i x_i^2 with lam from 1 to 1000 (condition number 1000).

    The optimizer sees lam*x + sigma*noise. Returns (initial loss, exact final loss).
    """
    g = torch.Generator().manual_seed(seed)
    lam = torch.logspace(0, 3, QUADRATIC_DIM, dtype=torch.float64)
    x = torch.nn.Parameter(torch.ones(QUADRATIC_DIM, dtype=torch.float64))
    opt = make_optimizer([x])

    def loss() -> float:
        return 0.5 * float((lam * x.detach() ** 2).sum())

    initial = loss()
    for _ in range(steps):
        x.grad = lam * x.detach() + QUADRATIC_SIGMA * torch.randn(QUADRATIC_DIM, generator=g, dtype=torch.float64)
        opt.step()
    return initial, loss()


QUADRATIC_DIM, QUADRATIC_SIGMA = 50, 1.0


def quadratic_bound(initial_loss: float, max_step_size: float) -> float:
    """What a converged stochastic first-order method reaches on the noisy quadratic.

    With step size a per element and gradient noise sigma, SGD's stationary loss per
    coordinate is about a*sigma^2/4 (E[x_i^2] = a sigma^2 / (2 lam_i) for small
    a*lam_i), and dampened momentum does not change that to first order. SoftAdam's
    per-element step is at most lr*(1+eta) because its denominator is >= 1. The bound
    allows twice that noise floor plus 1e-4 of the initial loss for the deterministic
    part, which the slowest direction (lam=1) must have shed within the budget.
    """
    noise_floor = QUADRATIC_DIM * max_step_size * QUADRATIC_SIGMA**2 / 4
    return 2 * noise_floor + 1e-4 * initial_loss


@pytest.mark.parametrize("eta", [0.0, 1.0, 4.0])
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
def test_noisy_ill_conditioned_quadratic(eta: float, foreach: bool) -> None:
    lr = 0.01
    initial, final = noisy_quadratic_final_loss(lambda p: SoftAdam(p, lr=lr, eta=eta, foreach=foreach), steps=1000)
    bound = quadratic_bound(initial, lr * (1 + eta))
    assert final < bound, f"final loss {final:.4g} >= bound {bound:.4g} (initial {initial:.4g})"


def test_noisy_quadratic_bound_is_not_vacuous() -> None:
    # Same budget, a learning rate 100x too small: the lam=1 direction barely moves.
    lr, eta = 1e-4, 1.0
    initial, final = noisy_quadratic_final_loss(lambda p: SoftAdam(p, lr=lr, eta=eta), steps=1000)
    assert final > quadratic_bound(initial, lr * (1 + eta))


# --- A small language model on text from a known Markov chain ----------------------

VOCAB, SEQ_LEN, BATCH = 12, 24, 32


def markov_chain(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A random first-order chain: (transition matrix, stationary distribution, entropy rate in nats)."""
    concentration = torch.full((VOCAB,), 0.3, dtype=torch.float64)
    gamma = torch.distributions.Gamma(concentration, torch.ones(VOCAB, dtype=torch.float64))
    torch.manual_seed(seed)
    transition = gamma.sample((VOCAB,))
    transition = transition / transition.sum(dim=1, keepdim=True)
    # Stationary distribution: left eigenvector for eigenvalue 1, by power iteration.
    pi = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    for _ in range(10_000):
        pi = pi @ transition
    row_entropy = -(transition * torch.log(transition.clamp_min(1e-300))).sum(dim=1)
    return transition.float(), pi.float(), float(pi.double() @ row_entropy)


def sample_sequences(transition: torch.Tensor, pi: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(n, SEQ_LEN + 1, dtype=torch.long)
    tokens[:, 0] = torch.multinomial(pi.expand(n, -1), 1, generator=g).squeeze(1)
    for t in range(SEQ_LEN):
        tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=g).squeeze(1)
    return tokens


class TinyLSTMLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 32)
        self.lstm = torch.nn.LSTM(32, 32, batch_first=True)
        self.head = torch.nn.Linear(32, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.head(hidden)


def oracle_cross_entropy(transition: torch.Tensor, held_out: torch.Tensor) -> float:
    """Cross-entropy of the true chain on the held-out tokens: the best any model can score there.

    Its expectation is the entropy rate; using the same sample as the model removes
    the sampling noise of a finite held-out set from the comparison.
    """
    probs = transition[held_out[:, :-1], held_out[:, 1:]]
    return float(-torch.log(probs.double()).mean())


def held_out_set() -> torch.Tensor:
    transition, pi, _ = markov_chain()
    return sample_sequences(transition, pi, 256, torch.Generator().manual_seed(2))


def train_markov_lm(make_optimizer, steps: int) -> tuple[float, float]:
    """Train on fresh samples each step; return (initial, final) held-out cross-entropy in nats."""
    transition, pi, _ = markov_chain()
    torch.manual_seed(0)
    model = TinyLSTMLM()
    opt = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(1)
    held_out = held_out_set()

    def cross_entropy(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    with torch.no_grad():
        initial = float(cross_entropy(held_out))
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(sample_sequences(transition, pi, BATCH, g)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        return initial, float(cross_entropy(held_out))


LM_STEPS, LM_MARGIN = 400, 0.03


def test_lstm_reaches_the_entropy_rate_of_its_markov_source() -> None:
    transition, _, entropy_rate = markov_chain()
    oracle = oracle_cross_entropy(transition, held_out_set())
    assert abs(oracle - entropy_rate) < 0.05  # the held-out set is large enough to be typical
    initial, final = train_markov_lm(lambda p: SoftAdam(p, lr=1.0, eta=1.0), LM_STEPS)
    assert initial > math.log(VOCAB) - 0.1  # starts near uniform guessing
    assert final < oracle + LM_MARGIN, f"cross-entropy {final:.4f} vs the true chain's {oracle:.4f}"


def test_markov_lm_bound_is_not_vacuous() -> None:
    transition, _, _ = markov_chain()
    oracle = oracle_cross_entropy(transition, held_out_set())
    _, final = train_markov_lm(lambda p: SoftAdam(p, lr=0.01, eta=1.0), LM_STEPS)
    assert final > oracle + LM_MARGIN
