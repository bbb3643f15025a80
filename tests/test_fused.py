"""The fused CPU execution: agreement with the reference executions over long runs, its
float64 mean-of-v state, how SoftAdam picks it, and what happens without it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from softadam_nlp import SoftAdam
from softadam_nlp.softadam import softadam

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def two_threads():
    """Two intra-op threads, so tensors above the kernel's grain take its parallel branch."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def shapes() -> list[tuple[int, ...]]:
    # One tensor large enough to be split between threads (> 2 x 32768 elements), the
    # rest small: a bias, a matrix, a scalar-like tensor and an odd length.
    return [(300, 400), (400,), (64, 64), (1,), (1001,)]


def run(
    path: dict,
    dtype: torch.dtype,
    steps: int,
    nesterov: bool = False,
    eta: float = 1.0,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> tuple[list[torch.nn.Parameter], SoftAdam]:
    """``steps`` SoftAdam steps on fixed pseudo-random gradients whose scale differs by tensor."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes()]
    opt = SoftAdam(params, lr=0.01, eta=eta, weight_decay=weight_decay, nesterov=nesterov, **path)
    for _ in range(steps):
        for i, p in enumerate(params):
            p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** (i - 2)).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_matches_per_tensor_over_hundreds_of_steps(two_threads, dtype: torch.dtype, nesterov: bool) -> None:
    fused, fused_opt = run(dict(fused=True), dtype, 300, nesterov)
    reference, reference_opt = run(dict(foreach=False), dtype, 300, nesterov)
    for p, q in zip(fused, reference):
        if dtype == torch.float32:
            # Rounding differences random-walk over 300 steps; the foreach execution
            # drifts from the per-tensor one by the same order (a few 1e-7 of the scale).
            assert (p - q).abs().max() <= 1e-5 * q.abs().max()
        else:  # allow a bf16 rounding step where the float32 results straddle a boundary
            assert ((p.float() - q.float()).abs() <= 2 * 2**-8 * q.float().abs() + 1e-6).all()
        # The state is the reference's too, and the float64 mean is the mean of v.
        # The state holds AdamW's keys only; the kernel's mean is kept beside it.
        s, t = fused_opt.state[p], reference_opt.state[q]
        assert set(s) == set(t) == {"step", "exp_avg", "exp_avg_sq"}
        torch.testing.assert_close(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-5, atol=0)
        mean = fused_opt._kept_means[p].value
        assert mean.dtype == torch.float64
        torch.testing.assert_close(mean, s["exp_avg_sq"].double().mean(), rtol=1e-5, atol=0)
        assert q not in reference_opt._kept_means


def test_fused_is_deterministic_and_independent_of_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            params, _ = run(dict(fused=True), torch.float32, 20)
            results.setdefault(threads, []).append(params)
    finally:
        torch.set_num_threads(before)
    for p, q in zip(*results[1]):
        assert torch.equal(p, q)  # run to run: the same bits
    for p, q in zip(results[1][0], results[2][0]):  # threads only regroup one float64 sum
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_default_on_cpu_is_fused_and_an_explicit_foreach_is_honoured() -> None:
    default, default_opt = run({}, torch.float32, 3)
    _, per_tensor_opt = run(dict(foreach=False), torch.float32, 3)
    assert all(p in default_opt._kept_means for p in default)
    assert not per_tensor_opt._kept_means


def test_switching_executions_and_eta_rebuilds_the_mean(two_threads) -> None:
    # fused -> per-tensor -> fused, and eta 1 -> 0 -> 1 (an eta schedule): the kernel's
    # carried mean must never go stale. The run must match the per-tensor execution. The
    # mean is dropped while another execution runs, and carried through eta = 0.
    g = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=g) for s in shapes()]
    grads = [[torch.randn(s, generator=g) for s in shapes()] for _ in range(40)]
    schedule = (
        [(dict(fused=None, foreach=None), 1.0)] * 10
        + [(dict(fused=None, foreach=False), 1.0)] * 10
        + [(dict(fused=None, foreach=None), 0.0)] * 10
        + [(dict(fused=None, foreach=None), 1.0)] * 10
    )
    switching = [torch.nn.Parameter(p.clone()) for p in init]
    reference = [torch.nn.Parameter(p.clone()) for p in init]
    opt = SoftAdam(switching, lr=0.01)
    ref = SoftAdam(reference, lr=0.01, foreach=False)
    for (execution, eta), step_grads in zip(schedule, grads):
        opt.param_groups[0].update(execution, eta=eta)
        ref.param_groups[0]["eta"] = eta
        for p, q, grad in zip(switching, reference, step_grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        has_mean = [p in opt._kept_means for p in switching]
        assert all(has_mean) if execution["foreach"] is None else not any(has_mean)
    for p, q in zip(switching, reference):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max()


def test_fused_falls_back_or_refuses_where_it_cannot_run() -> None:
    w = torch.nn.Parameter(torch.randn(4, 6).t())  # a non-contiguous parameter
    w.grad = torch.ones(6, 4)
    opt = SoftAdam([w], lr=0.1)  # default: falls back to the per-tensor execution
    opt.step()
    assert w not in opt._kept_means
    with pytest.raises(RuntimeError, match="contiguous CPU parameters"):
        SoftAdam([w], lr=0.1, fused=True).step()

    class Subclass(torch.Tensor):  # an unknown subclass: the kernel cannot know what its memory holds
        pass

    s = torch.nn.Parameter(torch.ones(4).as_subclass(Subclass))
    s.grad = torch.ones(4)
    opt = SoftAdam([s], lr=0.1)
    opt.step()
    assert s not in opt._kept_means and (s.detach() < 1).all()
    with pytest.raises(RuntimeError, match="plain tensors, or DTensors"):
        SoftAdam([s], lr=0.1, fused=True).step()
    with pytest.raises(ValueError, match="fused=True cannot be combined with foreach"):
        SoftAdam([w], fused=True, foreach=False)


def test_functional_fused_needs_the_means() -> None:
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg_sq_means"):
        softadam(
            [p],
            [torch.ones(3)],
            [torch.zeros(3)],
            [torch.zeros(3)],
            [torch.tensor(0.0)],
            fused=True,
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            eta=1.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
        )


def test_kernel_rejects_mismatched_inputs() -> None:
    from softadam_nlp._fused import fused_cpu_kernel

    kernel = fused_cpu_kernel()
    p, m, v = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    args = ([1.0], [0.0], [1.0], [0.0], 0.1, 0.9, 1e-16, 1.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="parameter's size"):
        kernel.fused_softadam_([p], [torch.zeros(5)], [m], [v], [0.0], *args)
    with pytest.raises(RuntimeError, match="state dtype"):
        kernel.fused_softadam_([p], [torch.zeros(4)], [m.double()], [v], [0.0], *args)
    with pytest.raises(RuntimeError, match="one entry per parameter"):
        kernel.fused_softadam_([p], [torch.zeros(4)], [m], [v], [0.0, 0.0], *args)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.grad_sq_sums([torch.zeros(4, 4).t()])


def run_isolated(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=600,
    )


def test_without_the_kernel_softadam_warns_once_and_keeps_training(tmp_path: Path) -> None:
    # A machine whose compiler fails: a fresh extension cache and a "compiler" that
    # always fails. Training goes on with the per-tensor execution; fused=True says why not.
    code = """
        import warnings, torch
        from softadam_nlp import SoftAdam
        w = torch.nn.Parameter(torch.ones(3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = SoftAdam([w], lr=0.1)
            for _ in range(3):
                w.grad = torch.ones(3)
                opt.step()
        print("warnings", sum("fused CPU kernel could not be built" in str(c.message) for c in caught))
        print("mean kept", w in opt._kept_means, "moved", bool((w < 1).all()))
        try:
            SoftAdam([w], fused=True)
        except RuntimeError as error:
            print("refused:", error)
    """
    result = run_isolated(code, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), CXX="false")
    assert result.returncode == 0, result.stderr
    assert "warnings 1" in result.stdout and "mean kept False moved True" in result.stdout
    assert "refused: fused=True, but SoftAdam's fused CPU kernel could not be built" in result.stdout
    disabled = run_isolated(code, SOFTADAM_NO_FUSED="1")
    assert "warnings 0" in disabled.stdout and "mean kept False moved True" in disabled.stdout


def test_copies_of_the_package_share_one_kernel_build_and_a_changed_kernel_gets_its_own(tmp_path: Path) -> None:
    """Two checkouts (or an installed copy beside an editable one) load the build of the
    same kernel without rebuilding it, however they take turns; a kernel whose source
    differs is built under another name, so a stale library is never loaded."""
    import shutil

    from softadam_nlp._fused import fused_cpu_kernel, kernel_build_name

    kernel = fused_cpu_kernel()
    assert kernel is not None, "the fused CPU kernel is not available (make setup builds it)"
    library = Path(kernel.__file__)
    built = {path: path.stat().st_mtime_ns for path in library.parent.iterdir() if path.is_file()}
    copies = []
    for name in ("checkout-a", "checkout-b"):
        shutil.copytree(
            REPO / "softadam_nlp", tmp_path / name / "softadam_nlp", ignore=shutil.ignore_patterns("__pycache__")
        )
        copies.append(tmp_path / name)
    code = """
        import sys
        sys.path.insert(0, sys.argv[1])
        from softadam_nlp import _fused
        assert _fused.__file__.startswith(sys.argv[1]), _fused.__file__
        print(_fused.fused_cpu_kernel().__file__ if sys.argv[2] == "load" else _fused.kernel_build_name())
    """
    environment = {k: v for k, v in os.environ.items() if k != "SOFTADAM_NO_FUSED"}

    def in_copy(copy: Path, what: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), str(copy), what],
            capture_output=True,
            text=True,
            env=environment,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    for copy in (*copies, copies[0], REPO):  # in turns, the repository's own copy last
        assert in_copy(copy, "load") == str(library)
    rebuilt = [path.name for path, mtime in built.items() if path.stat().st_mtime_ns != mtime]
    assert not rebuilt, f"loading from another copy rebuilt {rebuilt}"
    changed = copies[1] / "softadam_nlp" / "csrc" / "fused_softadam_cpu.cpp"
    changed.write_text(changed.read_text() + "// a changed kernel\n")
    assert in_copy(copies[0], "name") == kernel_build_name()
    assert in_copy(copies[1], "name") != kernel_build_name()


def test_step_benchmark_reports_every_execution_against_fused_adamw(tmp_path: Path) -> None:
    import json

    record_path = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_optimizer.py"),
            "--workload",
            "tiny",
            "--rounds",
            "2",
            "--steps-per-round",
            "1",
            "--warmup",
            "1",
            "--json",
            str(record_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "SoftAdam's default path on CPU: fused" in result.stdout
    for row in ("| SoftAdam fused |", "| SoftAdam per-tensor |", "| AdamW fused | ", "| paper per-tensor loop |"):
        assert row in result.stdout
    record = json.loads(record_path.read_text())
    assert record["workload"] == "tiny" and record["model"] == {"parameters": 64 * 32 + 32 + 10, "tensors": 3}
    assert record["ratio_to_fused_adamw"]["AdamW fused"] == 1.0 and len(record["per_round_ms"]["SoftAdam fused"]) == 2


def test_end_to_end_benchmark_compares_both_toolkits(tmp_path: Path) -> None:
    import json

    from fairseq_cli import make_translation_data_bin
    from repo_scripts import run_repo_script

    data_bin = make_translation_data_bin(tmp_path / "translation")
    record_path = tmp_path / "e2e.json"
    result = run_repo_script(
        "scripts/bench_end_to_end.py",
        "--data-bin",
        data_bin,
        "--preset",
        "tiny",
        "--updates",
        "25",
        "--interval",
        "10",
        "--steps",
        "6",
        "--skip",
        "2",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--json",
        record_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "softadam / adam =" in result.stdout and "softadam / adamw_torch_fused =" in result.stdout
    record = json.loads(record_path.read_text())
    for toolkit, baseline in (("fairseq", "adam"), ("trainer", "adamw_torch_fused")):
        medians = record[toolkit]["median"]
        assert medians["softadam"] > 0 and medians[baseline] > 0
        assert record[toolkit]["ratio"] == medians["softadam"] / medians[baseline]
    assert record["fairseq"]["runs"]["softadam"][0]["intervals"]  # logged words/s, the first interval left out
    bad = run_repo_script("scripts/bench_end_to_end.py", "--toolkit", "fairseq", "--data-bin", tmp_path / "none")
    assert bad.returncode == 2 and "no fairseq data-bin" in bad.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sums_of_squares_match_float64_on_every_read_pattern(two_threads, dtype: torch.dtype) -> None:
    # Lengths below one block, at the four-stream span (4 x 16384) and past it with a
    # ragged tail; one list, so that threads' ranges also cut through tensors.
    from softadam_nlp._fused import fused_cpu_kernel

    g = torch.Generator().manual_seed(0)
    lengths = [1, 4095, 65536, 65537, 200705]
    grads = [(torch.randn(n, generator=g) * 10.0 ** (i % 3)).to(dtype) for i, n in enumerate(lengths)]
    sums = fused_cpu_kernel().grad_sq_sums(grads)
    expected = torch.stack([g.double().square().sum() for g in grads])
    torch.testing.assert_close(sums, expected, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


def test_kernel_moves_the_counters_and_means_as_torch_ops_would() -> None:
    from softadam_nlp._fused import fused_cpu_kernel

    kernel = fused_cpu_kernel()
    shared, own = torch.tensor(2.0**24), torch.tensor(3.0, dtype=torch.float64)
    # A counter two entries share (the pieces of one flattened tensor) advances once; a
    # float32 counter at 2**24 stays there, as `counter += 1` leaves it.
    assert kernel.increment_steps([shared, shared, own]) == [2.0**24, 2.0**24, 4.0]
    assert shared.item() == 2.0**24 and own.item() == 4.0
    means = [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float32)]
    kernel.write_scalars(means, [0.1, 0.1])
    assert means[0].item() == 0.1 and means[1].item() == torch.tensor(0.1).item()  # rounded to its dtype
    assert kernel.read_scalars(means) == [0.1, torch.tensor(0.1).item()]
    with pytest.raises(RuntimeError, match="one-element floating-point CPU tensors"):
        kernel.increment_steps([torch.zeros(2)])
    with pytest.raises(RuntimeError, match="one value per tensor"):
        kernel.write_scalars(means, [0.0])
