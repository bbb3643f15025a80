"""Translation corpora prepared the way fairseq's examples/translation/prepare-iwslt14.sh does.

The steps, each a function here so that they can be tested one by one:
1. IWSLT'14 training text (`train.tags.de-en.{de,en}`): drop the `<url>`,
   `<talkid>` and `<keywords>` lines, strip `<title>`/`<description>` tags;
   dev/test XML files: keep the `<seg>` contents, with ’ as '.
2. Moses tokenization (sacremoses, with its default escaping, as tokenizer.perl) and
   lowercasing.
3. Training pairs cleaned as Moses' clean-corpus-n.perl with ratio 1.5 and 1-175
   tokens (done on the tokenized text, before lowercasing, as the shell script does).
4. Valid = every 23rd cleaned training pair; test = dev2010 + tedx dev2012 + tst2010-2012.
5. One joint BPE model (subword-nmt, 10,000 merges) learnt on train src + tgt and
   applied to every split.
Every function returns new lists; nothing here touches the disk except the BPE helper.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from softadam_nlp.data import data_roots

IWSLT14_TEST_SETS = (
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
)
# Local copies looked for under each data root (softadam_nlp.data.data_roots), first found wins.
LOCAL_TRANSLATION_SOURCES = (
    ("iwslt14", "iwslt14/de-en.tgz"),
    ("iwslt14", "de-en.tgz"),
    ("iwslt14", "iwslt14/de-en/train.tags.de-en.de"),
    ("multi30k", "multi30k/train.de.gz"),
)


def find_translation_source(data_dir: Optional[os.PathLike] = None) -> Optional[tuple[str, Path]]:
    """`(corpus, raw)` for a local IWSLT'14 archive or folder, else Multi30k De-En (the
    stand-in where IWSLT'14 cannot be fetched), in the data roots; None if there is none.
    `raw` is what scripts/prepare_iwslt14.py takes as --raw-dir."""
    for root in data_roots(data_dir):
        for corpus, relative in LOCAL_TRANSLATION_SOURCES:
            path = root / relative
            if path.is_file():
                return corpus, path if path.suffix == ".tgz" else path.parent
    return None


_DROPPED_TAG_LINES = ("<url>", "<talkid>", "<keywords>")
_STRIPPED_TAGS = re.compile(r"</?(title|description)>")
_SEG = re.compile(r"<seg id=\"?\d+\"?>\s*(.*?)\s*</seg>\s*$")


def strip_train_tags(lines: Iterable[str]) -> list[str]:
    """IWSLT train.tags text: metadata lines dropped, title/description tags removed."""
    return [
        _STRIPPED_TAGS.sub("", line)
        for line in lines
        if not any(tag in line for tag in _DROPPED_TAG_LINES)
    ]


def extract_xml_segments(lines: Iterable[str]) -> list[str]:
    """The sentences of an IWSLT dev/test XML file, one per `<seg id=...>` line."""
    out = []
    for line in lines:
        if "<seg id" not in line:
            continue
        match = _SEG.search(line)
        text = match.group(1) if match else re.sub(r"<seg id=\"?\d+\"?>\s*|\s*</seg>\s*", "", line)
        out.append(text.replace("\u2019", "'"))
    return out


def moses_tokenize(lines: Sequence[str], lang: str) -> list[str]:
    """sacremoses with tokenizer.perl's defaults (escaping on, no aggressive dashes)."""
    from sacremoses import MosesTokenizer

    tokenizer = MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(line, return_str=True, escape=True) for line in lines]


def lowercase(lines: Iterable[str]) -> list[str]:
    return [line.lower() for line in lines]


def clean_parallel(
    src: Sequence[str], tgt: Sequence[str], min_len: int = 1, max_len: int = 175, ratio: float = 1.5,
    max_word_length: int = 1000,
) -> tuple[list[str], list[str]]:
    """Moses clean-corpus-n.perl: normalise spaces, drop empty, too short or long,
    length-ratio > `ratio` and over-long-word pairs."""
    if len(src) != len(tgt):
        raise ValueError(f"parallel files differ in length: {len(src)} vs {len(tgt)} lines")
    # Pipes are Moses factor separators: removed unless the first line looks factored.
    factored = bool(src) and ("|" in src[0] or "|" in tgt[0])
    long_word = re.compile(r"[^\s|]{%d}" % (max_word_length + 1))
    kept_src, kept_tgt = [], []
    for s, t in zip(src, tgt):
        if not factored:
            s, t = s.replace("|", ""), t.replace("|", "")
        s, t = " ".join(s.split()), " ".join(t.split())
        if not s or not t:
            continue
        ns, nt = len(s.split(" ")), len(t.split(" "))
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        if long_word.search(s) or long_word.search(t):
            continue
        kept_src.append(s)
        kept_tgt.append(t)
    return kept_src, kept_tgt


def split_every(lines: Sequence[str], every: int = 23) -> tuple[list[str], list[str]]:
    """(train, valid): valid is every `every`-th line (1-based), as `awk NR%23`."""
    train = [line for i, line in enumerate(lines, 1) if i % every != 0]
    valid = [line for i, line in enumerate(lines, 1) if i % every == 0]
    return train, valid


def learn_joint_bpe(train_src: Sequence[str], train_tgt: Sequence[str], merges: int) -> str:
    """subword-nmt's learn_bpe over the concatenated training text; returns the codes."""
    from subword_nmt.learn_bpe import learn_bpe

    codes = io.StringIO()
    learn_bpe(io.StringIO("\n".join(list(train_src) + list(train_tgt)) + "\n"), codes, merges)
    return codes.getvalue()


def apply_bpe(codes: str, lines: Iterable[str]) -> list[str]:
    from subword_nmt.apply_bpe import BPE

    bpe = BPE(io.StringIO(codes))
    return [bpe.process_line(line + "\n").rstrip("\n") for line in lines]
