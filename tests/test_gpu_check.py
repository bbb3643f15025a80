"""scripts/gpu_check.py on the CPU: its dry run plans every step with commands their own
parsers accept, a refused argument or missing data is reported, and its runner records
failed and timed-out steps while the others still run. Also the shapes the GPU benchmarks
step, and the AWD-LSTM step timer at tiny scale. Nothing here needs a GPU."""

from __future__ import annotations

import gzip
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from repo_scripts import REPO, run_repo_script

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


def write_data(root: Path) -> Path:
    """Small PTB-layout text (every valid/test word is a training word) and Multi30k-layout gzipped pairs."""
    rng = random.Random(0)
    (root / "ptb").mkdir(parents=True)
    for split, n in (("train", 300), ("valid", 30), ("test", 30)):
        lines = [" " + " ".join(f"w{rng.randrange(20)}" for _ in range(rng.randint(4, 9))) + " " for _ in range(n)]
        (root / "ptb" / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "multi30k").mkdir()
    for split, n in (("train", 200), ("val", 20)):
        words = [[rng.randrange(15) for _ in range(rng.randint(3, 7))] for _ in range(n)]
        for lang, prefix in (("de", "quelle"), ("en", "target")):
            text = "\n".join(" ".join(f"{prefix}{w}" for w in sentence) for sentence in words) + "\n"
            (root / "multi30k" / f"{split}.{lang}.gz").write_bytes(gzip.compress(text.encode()))
    return root


def run_gpu_check(*args: object) -> tuple[int, dict, str]:
    """gpu_check.py's exit code, its JSON record and its output; it sees only the data given here."""
    result = run_repo_script("scripts/gpu_check.py", *args, timeout=300, SOFTADAM_DATA_DIR="")
    out = Path(args[args.index("--out") + 1])
    record = json.loads((out / "gpu_check.json").read_text())
    return result.returncode, record, result.stdout + result.stderr


def test_dry_run_plans_every_step_with_commands_their_parsers_accept(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    data_bin = tmp_path / "data-bin"
    data_bin.mkdir()
    (data_bin / "dict.de.txt").write_text("quelle1 1\n")  # the dry run reads nothing more of it
    out = tmp_path / "out"
    code, record, output = run_gpu_check(
        "--dry-run", "--out", out, "--data-dir", data, "--no-verify", "--fairseq-data-bin", data_bin
    )
    assert code == 0, output[-3000:]
    assert record["dry_run"] and record["finished"]
    assert record["data"]["ptb"] == str(data / "ptb") and record["data"]["multi30k"] == str(data / "multi30k")
    steps = {entry["name"]: entry for entry in record["steps"]}
    assert list(steps) == list(gpu_check.STEPS)
    fairseq_installed = gpu_check.importlib.util.find_spec("fairseq") is not None
    for name, entry in steps.items():
        if name == "fairseq_train" and not fairseq_installed:
            assert entry["status"] == "unavailable" and entry["reason"] == "fairseq is not installed on this machine"
        else:
            assert entry["status"] == "planned" and entry["reason"] is None, (name, entry["reason"])
        (command,) = entry["commands"]
        assert command and entry["time_limit_seconds"] == gpu_check.STEP_LIMITS_S[name]
    assert sum(gpu_check.STEP_LIMITS_S.values()) <= record["time_limit_seconds"] == 480

    def command(name: str) -> list[str]:
        return steps[name]["commands"][0]

    assert command("gpu_tests")[1:5] == ["-m", "pytest", "-m", "gpu"]
    assert "tests/test_gpu_check.py" not in command("gpu_tests")  # only files that use the gpu marker
    for name, workload in (("optimizer_step_transformer", "transformer"), ("optimizer_step_gpt2_1p3b", "gpt2_1p3b")):
        assert command(name)[1].endswith("scripts/bench_optimizer.py")
        assert command(name)[2:6] == ["--device", "cuda", "--workload", workload]
        assert set(steps[name]["env"]) == {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    assert {"--device", "cuda", "--bf16", "--toolkit", "trainer"} <= set(command("trainer_throughput"))
    awd = command("awd_lstm_step_time")
    assert awd[awd.index("--preset") + 1] == "paper" and awd[awd.index("--data-dir") + 1] == str(data / "ptb")
    assert "--no-verify" in awd
    translation = command("translation_step_time")
    assert translation[translation.index("--train-src") + 1] == str(data / "multi30k" / "train.de.gz")
    assert translation[translation.index("--max-steps") + 1] == "220"
    fairseq = command("fairseq_train")
    assert fairseq[1] == str(data_bin) and "softadam" in fairseq and "transformer_iwslt_de_en" in fairseq

    summary = (out / "gpu_check.md").read_text()
    assert "dry run" in summary
    for name in gpu_check.STEPS:
        assert f"| {name} | {steps[name]['status']} |" in summary


def test_gpu_tests_are_found_by_the_marker_in_the_code(tmp_path: Path) -> None:
    files = {
        "decorated": "import pytest\n@pytest.mark.gpu\ndef test_a(): pass\n",
        "module": "import pytest\npytestmark = [pytest.mark.gpu]\n",
        "alias": "import pytest as pt\ngpu = pt.mark.gpu\n",
        "mentioned": "SAMPLE = 'pytestmark = pytest.mark.gpu'  # in a string: not a use\n",
        "other": "import pytest\n@pytest.mark.slow\ndef test_a(): pass\n",
    }
    for name, text in files.items():
        (tmp_path / f"test_{name}.py").write_text(text)
    found = {name for name in files if gpu_check.uses_gpu_marker(tmp_path / f"test_{name}.py")}
    assert found == {"decorated", "module", "alias"}


def test_dry_run_reports_refused_arguments_and_missing_data(tmp_path: Path) -> None:
    """A step whose command its parser refuses fails the dry run, with the parser's message;
    a step whose data is missing is unavailable (not failed), saying what was looked for."""
    (tmp_path / "empty").mkdir()
    code, record, output = run_gpu_check(
        "--dry-run",
        "--out",
        tmp_path / "out",
        "--data-dir",
        tmp_path / "empty",
        "--only",
        "gpu_tests",
        "optimizer_step_transformer",
        "awd_lstm_step_time",
        "translation_step_time",
        "--step-args",
        "gpu_tests=--no-such-pytest-option",
        "--step-args",
        "optimizer_step_transformer=--workload nonesuch",
    )
    assert code == 1, output[-3000:]
    steps = {entry["name"]: entry for entry in record["steps"]}
    assert steps["gpu_tests"]["status"] == "failed"
    assert "pytest refused its arguments" in steps["gpu_tests"]["reason"]
    assert "--no-such-pytest-option" in steps["gpu_tests"]["reason"]
    assert steps["optimizer_step_transformer"]["status"] == "failed"
    assert "invalid choice: 'nonesuch'" in steps["optimizer_step_transformer"]["reason"]
    assert steps["awd_lstm_step_time"]["status"] == "unavailable"
    assert "Penn Treebank not found" in steps["awd_lstm_step_time"]["reason"]
    assert steps["translation_step_time"]["status"] == "unavailable"
    assert "Multi30k not found" in steps["translation_step_time"]["reason"]
    for name in ("optimizer_step_gpt2_1p3b", "trainer_throughput", "fairseq_train"):
        assert steps[name]["status"] == "not selected" and steps[name]["commands"] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA records")
def test_a_run_without_cuda_records_every_step_as_unavailable(tmp_path: Path) -> None:
    code, record, output = run_gpu_check(
        "--out", tmp_path / "out", "--only", "gpu_tests", "optimizer_step_gpt2_1p3b", "trainer_throughput"
    )
    assert code == 0, output[-3000:]
    assert not record["dry_run"] and record["finished"]
    for entry in record["steps"]:
        if entry["status"] != "not selected":
            assert entry["status"] == "unavailable" and "CUDA is not available" in entry["reason"], entry
            assert entry["commands"] and entry["wall_seconds"] is None


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie has finished


def test_runner_records_a_failed_and_a_timed_out_step_and_runs_the_next(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    python = sys.executable
    grandchild = tmp_path / "grandchild.pid"
    measured = work / "measured.json"
    steps = [
        gpu_check.Step(
            "fails", "a command that fails", [python, "-c", "print('partial output'); raise SystemExit(3)"], limit_s=30
        ),
        gpu_check.Step(
            "hangs",
            "a command (and its child) past its limit",
            [
                python,
                "-c",
                "import subprocess, sys, time; "
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                f"open({str(grandchild)!r}, 'w').write(str(child.pid)); print('waiting', flush=True); time.sleep(60)",
            ],
            limit_s=3,
        ),
        gpu_check.Step(
            "measures",
            "a command that writes its results",
            [python, "-c", f"import json; json.dump({{'ms': 1.5}}, open({str(measured)!r}, 'w'))"],
            read_results=lambda: json.loads(measured.read_text()),
            summarize=lambda results: [f"{results['ms']} ms"],
            limit_s=30,
        ),
    ]
    ctx = gpu_check.Context(
        python=python,
        work=work,
        dry_run=False,
        data={},
        fairseq_data_bin=work,
        no_verify=False,
        cuda_missing=None,
        fairseq_missing=None,
    )
    header = {"dry_run": False, "command": ["test"], "time_limit_seconds": 60, "machine": {}, "data": {}}
    report = gpu_check.Report(out, header, steps)
    started = time.monotonic()
    assert not gpu_check.execute(steps, report, ctx, deadline=time.monotonic() + 60, total_limit_s=60)
    assert time.monotonic() - started < 30
    record = json.loads((out / "gpu_check.json").read_text())
    failed, hung, measured_entry = record["steps"]
    assert failed["status"] == "failed" and failed["exit_code"] == 3 and failed["reason"] == "exit code 3"
    assert "partial output" in failed["output_tail"]
    assert hung["status"] == "timed out" and hung["exit_code"] is None and "3 s limit" in hung["reason"]
    assert "waiting" in hung["output_tail"] and hung["wall_seconds"] < 20
    deadline = time.monotonic() + 5
    while is_running(int(grandchild.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_running(int(grandchild.read_text())), "the timed-out step's child outlived it"
    assert measured_entry["status"] == "done" and measured_entry["results"] == {"ms": 1.5}
    assert measured_entry["summary"] == ["1.5 ms"]
    assert "| measures | done |" in (out / "gpu_check.md").read_text()


def test_benchmark_shapes_are_the_models_they_stand_for() -> None:
    """bench_optimizer lists its GPU workloads' shapes by hand (no fairseq, no model on the
    GPU machine): they must be the parameters the real models have, in their order."""
    import bench_optimizer
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=2048, n_head=16, vocab_size=50257, n_positions=2048))
    shapes = bench_optimizer.gpt2_shapes(**bench_optimizer.GPT2_1P3B)
    assert shapes == [p.shape for p in gpt2.parameters()]
    assert len(shapes) == 292 and sum(math.prod(s) for s in shapes) == 1_315_723_264  # about 1.3B

    fairseq = pytest.importorskip("fairseq")
    del fairseq
    import argparse

    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel, transformer_iwslt_de_en

    dictionary = Dictionary()
    for i in range(10152 - len(dictionary)):
        dictionary.add_symbol(f"tok{i}")
    args = argparse.Namespace(share_all_embeddings=True)
    transformer_iwslt_de_en(args)

    class Task:
        source_dictionary = target_dictionary = dictionary

    model = TransformerModel.build_model(args, Task())
    shapes = bench_optimizer.transformer_iwslt_de_en_shapes(10152)
    assert shapes == [p.shape for p in model.parameters()]
    assert len(shapes) == 253 and sum(math.prod(s) for s in shapes) == 36_741_120


def test_awd_lstm_step_timer_reports_the_full_run_it_implies(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    record_path = tmp_path / "awd.json"
    result = run_repo_script(
        "scripts/bench_awd_lstm.py",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data-dir",
        data,
        "--no-verify",
        "--steps",
        4,
        "--warmup",
        2,
        "--json",
        record_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(record_path.read_text())
    assert record["lr"] == 30.0 and record["weight_drop"] == 0.6  # run_language_modeling.py's tiny SoftAdam
    assert len(record["step_end_seconds"]) == 6 and record["steps_timed"] == 4
    assert record["full_run_steps"] == record["steps_per_epoch"] * 3
    expected = record["full_run_steps"] * record["seconds_per_step"]["mean"] / 3600
    assert math.isclose(record["full_run_hours"]["training_steps"], expected)
    assert f"= {record['full_run_steps']:,} steps)" in result.stdout
    summary = gpu_check.summarize_awd_lstm({k: v for k, v in record.items() if k != "step_end_seconds"})
    assert "over 4 steps after 2" in summary[0] and "not Table 2's 340,500" in summary[-1]


def test_results_are_read_from_what_the_commands_write(tmp_path: Path) -> None:
    """The readers behind the GPU steps' results, on files in the formats their commands
    write: pytest's JUnit XML, run_translation.py's --step-times, fairseq's JSON log."""
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\npytestmark = pytest.mark.gpu\n"
        "def test_ok(): pass\ndef test_bad(): assert 1 == 2, 'planted'\n"
        "@pytest.mark.skip\ndef test_skipped(): pass\n"
    )
    junit = tmp_path / "junit.xml"
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", tests],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 1, ran.stdout[-2000:]
    counts = gpu_check.junit_counts(junit, [tests.name])
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 0, 1)
    assert counts["not_passed"] == ["test_sample::test_bad (failure: AssertionError: planted)"]
    assert gpu_check.summarize_tests(counts)[0] == "1 passed, 1 failed, 0 errors, 1 skipped (in test_sample.py)"

    step_times = tmp_path / "steps.json"
    ends = [0.0, 5.0] + [5.0 + 0.1 * i for i in range(1, 220 - 1)]  # a slow first step, then 100 ms each
    details = {"batch_size": 256, "parameters": 10, "train_pairs": 29000, "mean_target_tokens": 14.0}
    step_times.write_text(json.dumps({**details, "mean_source_tokens": 15.0, "step_end_seconds": ends}))
    results = gpu_check.translation_results(step_times, tmp_path / "no-metrics.json")
    assert results["steps_timed"] == 200 and math.isclose(results["seconds_per_step"]["mean"], 0.1)
    assert math.isclose(results["full_run_hours"], 70_000 * 0.1 / 3600) and results["valid_bleu"] is None
    assert "about 3,584 target tokens" in gpu_check.summarize_translation(results)[0]

    log = tmp_path / "train.log"
    lines = [
        json.dumps({"epoch": 1, "loss": "9", "num_updates": str(n), "wps": str(wps), "ups": "2", "wpb": "3000"})
        for n, wps in ((50, 1000), (100, 30000), (150, 30000), (200, 20000))
    ]
    log.write_text("\n".join(lines) + "\n")
    results = gpu_check.fairseq_results(log)
    assert math.isclose(results["seconds_per_update"], 0.1)  # the first, start-up interval left out
    assert results["words_per_second"] == 30000 and len(results["intervals"]) == 4
    assert "100.0 ms/update" in gpu_check.summarize_fairseq(results)[0]
