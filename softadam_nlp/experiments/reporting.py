"""Tables and curves from run records (one JSON file per run), beside the paper's figures."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

# The paper's numbers, for the adjacent columns.
PAPER = {
    "iwslt14": {  # Table 3: validation perplexity and BLEU
        "sgd": {"valid_ppl": 4.14, "bleu": 31.43},
        "softadam": {"valid_ppl": 4.02, "bleu": 32.76},
        "adamw": {"valid_ppl": 3.87, "bleu": 34.44},
    },
    "ptb": {  # Table 2: validation perplexity, mean +- std over 3 seeds
        "softadam": {"valid_ppl": 63.63},
        "sgd": {"valid_ppl": 66.64},
        "adam": {"valid_ppl": 62.03},
    },
}
# Per experiment: (record field, column title, paper field or None).
COLUMNS = {
    "iwslt14": [
        ("valid_ppl", "val ppl", "valid_ppl"),
        ("tokenized_bleu", "BLEU (tok.)", "bleu"),
        ("sacrebleu", "sacreBLEU", None),
    ],
    "ptb": [("valid_ppl", "val ppl", "valid_ppl"), ("test_ppl", "test ppl", None)],
}
OPTIMIZER_ORDER = ("sgd", "softadam", "adam", "adamw")


def load_records(folder: Path) -> list[dict]:
    """Every finished record (`*.json`) under `folder`."""
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def run_setting(record: dict, config_key: str, flag: str) -> float | None:
    """A setting of the run: `config[config_key]` (Trainer runs) or the value of `flag` in
    its recorded command (fairseq); None when the record has neither."""
    value = (record.get("config") or {}).get(config_key)
    if value is None:
        value = command_value(record, flag)
    return float(value) if value is not None else None


def learning_rate(record: dict) -> float | None:
    """The run's peak learning rate: `config.lr` (Trainer runs) or `--lr` of its command (fairseq)."""
    return run_setting(record, "lr", "--lr")


def valid_ppl_curve(record: dict) -> list[float]:
    """Validation perplexity after each epoch the run logged one, in order."""
    return [e["valid_ppl"] for e in record.get("epochs", []) if "valid_ppl" in e]


def last_epoch_valid_ppl(record: dict) -> float | None:
    """Validation perplexity logged at the last epoch (the final weights, not averaged or best)."""
    values = valid_ppl_curve(record)
    return values[-1] if values else None


def mean_std(values: Sequence[float | None]) -> str:
    """`mean ± std` over the runs that have the value ("-" when none has it)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def command_value(record: dict, flag: str) -> str | None:
    """The value given to `flag` in the run's recorded command line, if any."""
    command = record.get("command", [])
    return command[command.index(flag) + 1] if flag in command else None


def eta_schedule(record: dict) -> tuple[str, float, float] | None:
    """(kind, eta at the start, eta at the end) of a SoftAdam run whose eta was scheduled;
    None for a constant eta or another optimizer. From `config` (Trainer runs) or the
    `--softadam-eta-schedule/--softadam-eta/--softadam-eta-end` flags (fairseq)."""
    config = record.get("config") or {}
    kind = config.get("eta_schedule") or command_value(record, "--softadam-eta-schedule")
    if record.get("optimizer") != "softadam" or kind in (None, "constant"):
        return None
    return kind, softadam_eta(record), run_setting(record, "eta_end", "--softadam-eta-end")


def warmup_steps(record: dict) -> int | None:
    """The run's warmup length: `config.warmup_steps` (Trainer runs) or `--warmup-updates`
    of its command (fairseq); None when the record does not say."""
    value = run_setting(record, "warmup_steps", "--warmup-updates")
    return int(value) if value is not None else None


def run_label(record: dict) -> str:
    """What a table row or a curve stands for: the optimizer, SoftAdam's eta schedule when it
    has one (`softadam, eta 2→0 linear`) and SoftAdam's warmup when it has one
    (`softadam, warmup 100`; the paper's SoftAdam has none), so such runs never pool with
    the paper's setting."""
    label = record["optimizer"]
    schedule = eta_schedule(record)
    if schedule is not None:
        kind, start, end = schedule
        label += f", eta {start:g}→{end:g} {kind}"
    warmup = warmup_steps(record) if record["optimizer"] == "softadam" else None
    if warmup:
        label += f", warmup {warmup}"
    return label


def label_rank(label: str) -> tuple[int, str]:
    """Table order: the paper's optimizer order, scheduled variants right after their optimizer."""
    optimizer = label.split(",")[0]
    return (OPTIMIZER_ORDER.index(optimizer) if optimizer in OPTIMIZER_ORDER else 99, label)


def markdown_table(records: list[dict], experiment: str, by_lr: bool = False) -> str:
    """One row per optimizer (and eta schedule, see `run_label`): mean ± std over seeds
    (n runs), the paper's figure beside each. `by_lr`: one row per optimizer and
    learning rate (a sweep), with the last epoch's validation perplexity beside the final one."""
    by_optimizer: dict = defaultdict(list)
    for record in records:
        by_optimizer[(run_label(record), learning_rate(record)) if by_lr else run_label(record)].append(record)
    header = ["optimizer", "lr", "runs", "last-epoch val ppl"] if by_lr else ["optimizer", "runs"]
    for _, title, paper_key in COLUMNS[experiment]:
        header.append(title)
        if paper_key:
            header.append(f"paper {title.split(' (')[0]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(by_optimizer, key=lambda key: (label_rank(key[0]), key[1]) if by_lr else label_rank(key)):
        runs = by_optimizer[key]
        label = key[0] if by_lr else key
        row = (
            [label, f"{key[1]:g}", str(len(runs)), mean_std([last_epoch_valid_ppl(r) for r in runs])]
            if by_lr
            else [label, str(len(runs))]
        )
        for key, _, paper_key in COLUMNS[experiment]:
            row.append(mean_std([r[key] for r in runs]))
            if paper_key:  # the paper has constant-eta SoftAdam only
                paper = PAPER[experiment].get(label, {}).get(paper_key)
                row.append(f"{paper:.2f}" if paper is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# Per experiment, the metrics a per-seed table shows: validation perplexity (lower is
# better), and for translation tokenized BLEU (higher is better).
PER_SEED_METRICS = {"iwslt14": ("valid_ppl", "tokenized_bleu"), "ptb": ("valid_ppl",)}


def per_seed_table(records: list[dict], experiment: str, baseline: str | None = None) -> str:
    """One row per `run_label`, one column per seed: the validation perplexity (Multi30k /
    IWSLT: `ppl / BLEU`). With `baseline` (a row label, e.g. `softadam`) each cell also
    shows, in brackets, its difference from the baseline's run of the same seed, and a last
    column the mean of those differences: the paired comparison that a few seeds allow, where
    seed-to-seed spread would swamp a comparison of means. Raises ValueError when two records
    share a label and seed (pooled settings, e.g. a sweep's learning rates) or when the
    baseline has no runs."""
    metrics = PER_SEED_METRICS[experiment]
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for record in records:
        label, seed = run_label(record), record.get("seed", 1)
        if seed in runs[label]:
            raise ValueError(f"two runs of {label!r} with seed {seed}: give records of one setting per label")
        runs[label][seed] = record
    if baseline is not None and baseline not in runs:
        raise ValueError(f"no runs labelled {baseline!r} to compare against; labels: {', '.join(sorted(runs))}")
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})

    def values(record: dict) -> str:
        return " / ".join(f"{record[m]:.2f}" for m in metrics)

    header = [f"seed {s}" for s in seeds] + (["mean change"] if baseline else [])
    lines = ["| run | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for label in sorted(runs, key=lambda label: (label != baseline, label_rank(label))):
        cells, changes = [], []
        for seed in seeds:
            record = runs[label].get(seed)
            reference = runs[baseline].get(seed) if baseline else None
            if record is None:
                cells.append("-")
            elif label == baseline or reference is None:
                cells.append(values(record))
            else:
                change = [record[m] - reference[m] for m in metrics]
                changes.append(change)
                cells.append(f"{values(record)} ({' / '.join(f'{c:+.2f}' for c in change)})")
        if baseline:
            cells.append(" / ".join(f"{statistics.mean(c):+.2f}" for c in zip(*changes)) if changes else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def short_ppl(value: float) -> str:
    """A perplexity at the precision a per-epoch table needs: whole numbers from 10 up, one
    decimal below."""
    return f"{value:.1f}" if round(value, 1) < 10 else f"{value:.0f}"


def per_epoch_table(records: list[dict], epochs_per_column: int = 6) -> str:
    """One row per run (`run_label` and seed), its validation perplexity after each epoch,
    `epochs_per_column` epochs to a column: the curves of the plot as numbers, to read where
    one run passes another. Epochs a run did not log are left out of its cells."""
    runs = sorted(records, key=lambda r: (label_rank(run_label(r)), r.get("seed", 1)))
    curves = [valid_ppl_curve(r) for r in runs]
    longest = max((len(curve) for curve in curves), default=0)
    starts = range(0, longest, epochs_per_column)
    last = [min(a + epochs_per_column, longest) for a in starts]
    header = [f"epochs {a + 1}-{b}" if b > a + 1 else f"epoch {b}" for a, b in zip(starts, last)]
    lines = ["| run | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    for record, curve in zip(runs, curves):
        cells = [", ".join(map(short_ppl, curve[a : a + epochs_per_column])) or "-" for a in starts]
        lines.append(f"| {run_label(record)}, seed {record.get('seed', 1)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on build machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def unigram_perplexity(train_lines: Sequence[str], eval_lines: Sequence[str], eos: str = "</s>") -> float:
    """Perplexity on `eval_lines` of the unigram model of `train_lines` (whitespace
    tokens, one `eos` per non-empty line, as the models count them): where a model sits
    before it has learned anything but word frequencies. A token never seen in
    training counts as seen once."""
    counts: dict[str, int] = defaultdict(int)
    for line in train_lines:
        for token in [*line.split(), eos] if line.strip() else []:
            counts[token] += 1
    total = sum(counts.values())
    log_prob, n = 0.0, 0
    for line in eval_lines:
        for token in [*line.split(), eos] if line.strip() else []:
            log_prob += math.log(max(counts.get(token, 0), 1) / total)
            n += 1
    return math.exp(-log_prob / max(n, 1))


def demo_reading(experiments: dict[str, tuple[list[dict], float | None]]) -> str:
    """Two or three sentences on what a demo's numbers show: per experiment (its records
    and its unigram perplexity), whether every optimizer got below the unigram model, and
    what a run this short cannot tell."""
    names = {"ptb": "PTB", "iwslt14": "translation"}
    below, above = [], []
    for experiment, (records, unigram) in experiments.items():
        if not records:
            continue
        ppls = sorted((r["valid_ppl"], r["optimizer"]) for r in records)
        span = f"{ppls[0][0]:.0f}-{ppls[-1][0]:.0f}" if len(ppls) > 1 else f"{ppls[0][0]:.0f}"
        if unigram is None:
            below.append(f"{names.get(experiment, experiment)} validation perplexity {span}")
            continue
        stuck = [name for ppl, name in ppls if ppl >= unigram]
        text = f"{span} on {names.get(experiment, experiment)} against the unigram model's {unigram:.0f}"
        below.append(text)
        above.extend(f"{name} ({names.get(experiment, experiment)})" for name in stuck)
    first = (
        (
            "Every optimizer learned more than word frequencies: validation perplexity "
            if not above
            else f"Not every optimizer left the unigram plateau ({', '.join(above)} did not): validation perplexity "
        )
        + "; ".join(below)
        + "."
    )
    return (
        f"{first} These are single short runs (one seed, a small model, a few minutes each), so they show that "
        "both pipelines train and evaluate end to end, not how the optimizers compare; the CPU-scale Tables 2 "
        "and 3 in docs/RESULTS.md compare them over three seeds at longer budgets."
    )


def plot_demo_curves(panels: list[tuple[str, list[dict], str, float | None]], path: Path) -> Path:
    """One figure, one panel per experiment (title, records, loss unit, the unigram
    model's cross-entropy in that unit or None): training loss against the optimizer
    step, one line per optimizer, the unigram model's level dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, records, ylabel, unigram_loss) in zip(axes[0], panels):
        for record in sorted(records, key=lambda r: label_rank(r["optimizer"])):
            curve = record.get("train_curve") or []
            if curve:
                ax.plot([q["step"] for q in curve], [q["loss"] for q in curve], label=record["optimizer"])
        if unigram_loss is not None:
            ax.axhline(unigram_loss, color="grey", linestyle="--", linewidth=1, label="unigram model")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    return save_figure(fig, path)


def plot_valid_curves(records: list[dict], path: Path, title: str) -> Path:
    """Validation perplexity per epoch, mean over seeds per optimizer and eta schedule
    (`run_label`; Figure 2 style)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for point in record.get("epochs", []):
            if "valid_ppl" in point:
                curves[run_label(record)][point["epoch"]].append(point["valid_ppl"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for optimizer in sorted(curves, key=label_rank):
        epochs = sorted(curves[optimizer])
        ax.plot(epochs, [statistics.mean(curves[optimizer][e]) for e in epochs], marker=".", label=optimizer)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation perplexity (mean over seeds)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend()
    return save_figure(fig, path)


def plot_lr_sweep(records: list[dict], path: Path, title: str, metric: str = "valid_ppl") -> Path:
    """`metric` against the learning rate, one line per optimizer (mean over seeds, log-log
    axes): where each optimizer's best rate lies and how sharply it degrades around it.
    Learning rates differ by orders of magnitude across optimizers, hence one x axis in log."""
    plt = pyplot()

    points: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        value = float(record[metric])
        if math.isfinite(value):
            points[run_label(record)][learning_rate(record)].append(value)
    fig, ax = plt.subplots(figsize=(6, 4))
    for optimizer in sorted(points, key=label_rank):
        lrs = sorted(points[optimizer])
        means = [statistics.mean(points[optimizer][lr]) for lr in lrs]
        (line,) = ax.plot(lrs, means, marker="o", label=optimizer)
        best = min(range(len(lrs)), key=means.__getitem__)
        ax.plot([lrs[best]], [means[best]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (mean over seeds; star: best)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if points:
        ax.legend()
    return save_figure(fig, path)


def softadam_eta(record: dict) -> float | None:
    """SoftAdam's eta of a run: `config.eta` (Trainer runs) or `--softadam-eta` of its command (fairseq)."""
    return run_setting(record, "eta", "--softadam-eta")


def sensitivity_grid(records: list[dict], metric: str = "valid_ppl") -> tuple[list[float], list[float], dict]:
    """(etas, lrs, {(eta, lr): mean metric over seeds}) of constant-eta SoftAdam records; a cell with a
    non-finite value (a diverged run) holds inf, a setting without a record is absent."""
    cells: dict[tuple[float, float], list[float]] = defaultdict(list)
    for record in records:
        if record.get("optimizer") == "softadam" and softadam_eta(record) is not None and eta_schedule(record) is None:
            value = float(record[metric])
            cells[(softadam_eta(record), learning_rate(record))].append(value if math.isfinite(value) else math.inf)
    grid = {key: (math.inf if math.inf in values else statistics.mean(values)) for key, values in cells.items()}
    return sorted({eta for eta, _ in grid}), sorted({lr for _, lr in grid}), grid


def sensitivity_table(records: list[dict], metric: str = "valid_ppl") -> str:
    """Markdown: one row per eta, one column per learning rate; the best cell in bold."""
    etas, lrs, grid = sensitivity_grid(records, metric)
    best = min(grid.values(), default=None)
    lines = ["| eta \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|" + "---|" * (len(lrs) + 1)]
    for eta in etas:
        row = []
        for lr in lrs:
            value = grid.get((eta, lr))
            text = "-" if value is None else "diverged" if math.isinf(value) else f"{value:.1f}"
            row.append(f"**{text}**" if value is not None and value == best else text)
        lines.append(f"| {eta:g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_sensitivity_heatmap(records: list[dict], path: Path, title: str, metric: str = "valid_ppl") -> Path:
    """SoftAdam's eta x learning-rate grid as a heatmap of `metric` (log colour scale,
    capped at 3x the best so one diverged cell does not wash out the rest)."""
    plt = pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    etas, lrs, grid = sensitivity_grid(records, metric)
    values = np.full((len(etas), len(lrs)), np.nan)
    for (eta, lr), value in grid.items():
        values[etas.index(eta), lrs.index(lr)] = value
    finite = values[np.isfinite(values)]
    best = float(finite.min()) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.1 * len(lrs) + 2.5, 0.6 * len(etas) + 1.8))
    shown = np.where(np.isinf(values), 3 * best, np.minimum(values, 3 * best))
    image = ax.imshow(shown, cmap="viridis_r", norm=LogNorm(vmin=best, vmax=3 * best), aspect="auto")
    for i in range(len(etas)):
        for j in range(len(lrs)):
            value = values[i, j]
            text = "" if np.isnan(value) else "div." if np.isinf(value) else f"{value:.0f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="black" if np.isfinite(value) and value < 1.5 * best else "white",
                fontweight="bold" if value == best else "normal",
            )
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(etas)), [f"{eta:g}" for eta in etas])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("eta")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=f"{metric.replace('_', ' ')} (capped at 3x best)")
    return save_figure(fig, path)
