"""Helpers for driving the real fairseq command-line tools from tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "fairseq_plugins"
BIN = Path(sys.executable).parent


def run_tool(tool: str, *args: object, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a fairseq console script (fairseq-train, ...) from this environment."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [str(BIN / tool), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def train_log(result: subprocess.CompletedProcess) -> list[dict]:
    """The per-update records that ``--log-format json --log-interval 1`` prints."""
    records = []
    for line in (result.stdout + result.stderr).splitlines():
        if "| train_inner |" in line:
            records.append(json.loads(line.split("| train_inner |", 1)[1]))
    return records


def write_reversal_corpus(directory: Path, seed: int = 0) -> None:
    """A deterministic translation task: the target is the source reversed, word by word renamed."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def pair() -> tuple[str, str]:
        src = [rng.randrange(24) for _ in range(rng.randint(3, 9))]
        return " ".join(f"s{i}" for i in src), " ".join(f"t{i}" for i in reversed(src))

    for split, size in (("train", 2000), ("valid", 100), ("test", 100)):
        pairs = [pair() for _ in range(size)]
        (directory / f"{split}.src").write_text("\n".join(p[0] for p in pairs) + "\n")
        (directory / f"{split}.tgt").write_text("\n".join(p[1] for p in pairs) + "\n")


def write_markov_text(directory: Path, seed: int = 0) -> None:
    """Monolingual text from a sparse first-order Markov chain over 30 words."""
    rng = random.Random(seed)
    successors = {w: rng.sample(range(30), 3) for w in range(30)}
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", 1500), ("valid", 100), ("test", 100)):
        out = []
        for _ in range(lines):
            word = rng.randrange(30)
            sentence = []
            for _ in range(rng.randint(5, 15)):
                sentence.append(f"w{word}")
                word = rng.choice(successors[word])
            out.append(" ".join(sentence))
        (directory / f"{split}.txt").write_text("\n".join(out) + "\n")


TINY_TRANSFORMER = [
    "--arch",
    "transformer",
    "--encoder-layers",
    1,
    "--decoder-layers",
    1,
    "--encoder-embed-dim",
    64,
    "--decoder-embed-dim",
    64,
    "--encoder-ffn-embed-dim",
    128,
    "--decoder-ffn-embed-dim",
    128,
    "--encoder-attention-heads",
    4,
    "--decoder-attention-heads",
    4,
    "--share-decoder-input-output-embed",
    "--dropout",
    0.1,
]

COMMON = [
    "--cpu",
    "--user-dir",
    PLUGIN_DIR,
    "--max-tokens",
    1000,
    "--seed",
    1,
    "--clip-norm",
    1.0,
    "--log-format",
    "json",
    "--log-interval",
    1,
    "--no-epoch-checkpoints",
]


def translation_args(
    data_bin: Path, save_dir: Path, *extra: object, lr: float = 1.0, total_updates: int = 300
) -> list[object]:
    """fairseq-train arguments for SoftAdam without warmup, linear decay to 0 at total_updates."""
    return [
        data_bin,
        "--task",
        "translation",
        *TINY_TRANSFORMER,
        *COMMON,
        "--criterion",
        "label_smoothed_cross_entropy",
        "--label-smoothing",
        0.1,
        "--optimizer",
        "softadam",
        "--lr",
        lr,
        "--softadam-eta",
        1.0,
        "--lr-scheduler",
        "polynomial_decay",
        "--total-num-update",
        total_updates,
        "--save-dir",
        save_dir,
        *extra,
    ]


def make_reversal_data_bin(raw: Path) -> Path:
    """The reversal corpus (src -> tgt) written to ``raw`` and binarized into ``raw/data-bin``
    (inside ``raw``: pytest's temporary folders of different modules share a parent)."""
    write_reversal_corpus(raw)
    out = raw / "data-bin"
    run_tool(
        "fairseq-preprocess",
        "--source-lang",
        "src",
        "--target-lang",
        "tgt",
        "--trainpref",
        raw / "train",
        "--validpref",
        raw / "valid",
        "--testpref",
        raw / "test",
        "--destdir",
        out,
        "--workers",
        1,
    )
    return out


def make_translation_data_bin(root: Path) -> Path:
    """A fairseq data-bin of the reversal corpus as de->en under ``root``: ``root/bin``."""
    raw = root / "raw"
    write_reversal_corpus(raw)
    for split in ("train", "valid", "test"):
        (raw / f"{split}.src").rename(raw / f"{split}.de")
        (raw / f"{split}.tgt").rename(raw / f"{split}.en")
    out = root / "bin"
    run_tool(
        "fairseq-preprocess",
        "--source-lang",
        "de",
        "--target-lang",
        "en",
        "--trainpref",
        raw / "train",
        "--validpref",
        raw / "valid",
        "--testpref",
        raw / "test",
        "--destdir",
        out,
        "--workers",
        1,
    )
    return out
