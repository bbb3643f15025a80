"""Penn Treebank (Mikolov's ptb.{train,valid,test}.txt) as token-id tensors.

The files are read where the user keeps them and checked against their canonical
md5 sums, so a truncated or different copy fails loudly instead of giving numbers
that cannot be compared with the paper's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import torch

from softadam_nlp.data import DATA_DIR_ENV, data_roots

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "valid", "test")
PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
EOS = "<eos>"
# The hub copy of the same files. datasets >= 4 no longer runs the repository's loading
# script, so we read its parquet export (one "sentence" per line, stripped).
PTB_HUB_DATASET = "ptb-text-only/ptb_text_only"
PTB_HUB_REVISION = "refs/convert/parquet"
PTB_HUB_CONFIG = "penn_treebank"
PTB_HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def find_ptb_dir(data_dir: Optional[os.PathLike] = None) -> Path:
    """The folder holding ptb.train.txt: `data_dir` (or its ptb/ subfolder), else
    $SOFTADAM_DATA_DIR, else ../shared/data beside the repository. Raises
    FileNotFoundError saying where it looked and how to supply the files."""
    candidates = [folder for root in data_roots(data_dir) for folder in (root, root / "ptb")]
    for candidate in candidates:
        if (candidate / "ptb.train.txt").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "(nowhere: no directory given)"
    raise FileNotFoundError(
        "Penn Treebank not found. Looked for ptb.train.txt in: " + looked + ". Pass --data-dir "
        f"or set {DATA_DIR_ENV} to a folder with Mikolov's ptb.train.txt, ptb.valid.txt and "
        "ptb.test.txt (from the 'simple-examples' archive of his RNNLM toolkit), or, where the "
        f"Hugging Face hub is reachable, load its copy ({PTB_HUB_DATASET}; --hub-dataset in "
        "hf_examples/run_language_modeling.py)."
    )


@dataclass
class PTBCorpus:
    """Token ids per split; every line ends with <eos>, as in Mikolov's setup."""

    directory: Path
    vocab: list[str]
    splits: dict[str, torch.Tensor]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def ptb_files(data_dir: Optional[os.PathLike] = None, verify: bool = True) -> dict[str, Path]:
    """`{split: path}` of ptb.{train,valid,test}.txt, each checked against its canonical
    md5 (`verify=False` skips the check, for other copies or generated test data)."""
    directory = find_ptb_dir(data_dir)
    files = {}
    for split in SPLITS:
        path = directory / f"ptb.{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (PTB needs train, valid and test)")
        if verify and md5sum(path) != PTB_MD5[split]:
            raise ValueError(
                f"{path} has md5 {md5sum(path)}, expected {PTB_MD5[split]} (Mikolov's PTB). "
                "The file is truncated or a different version; re-fetch it, or skip the check "
                "(verify=False, --no-verify) knowingly."
            )
        files[split] = path
    return files


def mikolov_text(sentences: Iterable[str]) -> str:
    """The text of Mikolov's file holding these sentences: each line is " words \\n". The
    hub copy stores stripped sentences; rebuilding the file lets it be checked against
    the same canonical md5 as a local copy."""
    return "".join(f" {sentence.strip()} \n" for sentence in sentences)


def load_ptb_hub(name: str = PTB_HUB_DATASET, verify: bool = True) -> "datasets.DatasetDict":
    """PTB from the Hugging Face hub as a DatasetDict {train, valid, test} with a "text"
    column, each split checked against the canonical md5 of Mikolov's file.

    `name` is a hub id (read at its parquet export, PTB_HUB_REVISION) or a local folder
    with the same layout (`penn_treebank/{train,validation,test}/*.parquet`). Raises
    ConnectionError when the hub cannot be reached and ValueError when a split is missing
    or its text differs from Mikolov's."""
    import datasets

    local = Path(name).is_dir()
    try:
        hub = datasets.load_dataset(name, data_dir=PTB_HUB_CONFIG,
                                    **({} if local else {"revision": PTB_HUB_REVISION}))
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ConnectionError(
            f"could not load {name} from the Hugging Face hub ({error}); use local files "
            f"(--data-dir or {DATA_DIR_ENV}) where the hub is not reachable"
        ) from error
    splits = {}
    for split, hub_split in PTB_HUB_SPLITS.items():
        if hub_split not in hub:
            raise ValueError(f"{name} has no {hub_split!r} split (found {sorted(hub)}); PTB needs train, validation and test")
        sentences = hub[hub_split]["sentence"]
        if verify:
            digest = hashlib.md5(mikolov_text(sentences).encode()).hexdigest()
            if digest != PTB_MD5[split]:
                raise ValueError(
                    f"{name} {hub_split}: the rebuilt ptb.{split}.txt has md5 {digest}, expected "
                    f"{PTB_MD5[split]} (Mikolov's PTB). The hub copy differs from the canonical "
                    "files; use local files, or skip the check (verify=False, --no-verify) knowingly."
                )
        splits[split] = datasets.Dataset.from_dict({"text": list(sentences)})
    return datasets.DatasetDict(splits)


def load_ptb(data_dir: Optional[os.PathLike] = None, verify: bool = True) -> PTBCorpus:
    """Load PTB, checking md5 sums (`verify=False` skips them for other copies)."""
    files = ptb_files(data_dir, verify)
    directory = files["train"].parent
    texts = {split: path.read_text() for split, path in files.items()}
    # The vocabulary is the training set's words in order of first appearance (the
    # order the AWD-LSTM code uses), plus <eos>.
    index: dict[str, int] = {}
    for line in texts["train"].splitlines():
        for word in line.split() + [EOS]:
            index.setdefault(word, len(index))
    splits = {}
    for split, text in texts.items():
        ids = []
        for line in text.splitlines():
            for word in line.split() + [EOS]:
                if word not in index:
                    raise ValueError(f"ptb.{split}.txt has out-of-vocabulary word {word!r}")
                ids.append(index[word])
        splits[split] = torch.tensor(ids, dtype=torch.long)
    return PTBCorpus(directory=directory, vocab=list(index), splits=splits)


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into `batch_size` contiguous streams: shape (length, batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    length = tokens.numel() // batch_size
    return tokens[: length * batch_size].view(batch_size, length).t().contiguous()
