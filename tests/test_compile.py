"""torch.compile of a whole training step (forward, backward, SoftAdam step)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from softadam_nlp import SoftAdam


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


# None: the default, which is the fused C++ kernel in eager mode on the CPU; under
# torch.compile it must trace one of the reference executions instead.
@pytest.mark.parametrize("foreach", [False, True, None], ids=["per-tensor", "foreach", "default"])
def test_compiled_training_step_matches_eager_without_recompiling(foreach: bool | None) -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)) for _ in range(8)]

    def run(compiled: bool):
        model = make_model()
        opt = SoftAdam(model.parameters(), lr=0.05, weight_decay=0.01, nesterov=True, foreach=foreach)

        def train_step(x, y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        counter = CompileCounterWithBackend("inductor")
        step_fn = torch.compile(train_step, backend=counter) if compiled else train_step
        frames_after = []
        for x, y in batches:
            step_fn(x, y)
            frames_after.append(counter.frame_count)
        return model, frames_after

    eager, _ = run(compiled=False)
    compiled, frames_after = run(compiled=True)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert frames_after[0] > 0, "nothing was compiled"
    # The step count enters as a tensor, so steps 2..8 reuse the graphs compiled by
    # step 2 (step 1 differs: the optimizer state is created there).
    assert frames_after[-1] == frames_after[1], f"recompiled as the step count grew: {frames_after}"
