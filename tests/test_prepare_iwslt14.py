"""IWSLT'14 / Multi30k preparation: each step, and the script on tiny archives built here."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from repo_scripts import run_repo_script

from softadam_nlp.data import translation as tr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import prepare_iwslt14 as prep  # noqa: E402


def test_train_tags_lines() -> None:
    lines = [
        "<url>http://x</url>",
        "<talkid>1</talkid>",
        "<keywords>a, b</keywords>",
        "<title>Ein Titel</title>",
        "<description>Eine Beschreibung</description>",
        "Ein Satz .",
    ]
    assert tr.strip_train_tags(lines) == ["Ein Titel", "Eine Beschreibung", "Ein Satz ."]


def test_xml_segments() -> None:
    xml = ['<doc docid="1">', '<seg id="1"> It\u2019s here. </seg>', "<talkid>3</talkid>", '<seg id="2">Two</seg>']
    assert tr.extract_xml_segments(xml) == ["It's here.", "Two"]


def test_clean_parallel_follows_clean_corpus_n() -> None:
    src = ["a b c", "  a   b ", "", "a", "a b c d", "x " * 176, "a|b c"]
    tgt = ["a b c", "a b", "a", "a b c", "a b c", "y", "a b c"]
    kept_src, kept_tgt = tr.clean_parallel(src, tgt, 1, 175, 1.5)
    # kept: identical lengths; whitespace normalised; pipes removed (not a factored corpus)
    assert kept_src == ["a b c", "a b", "a b c d", "ab c"]
    assert kept_tgt == ["a b c", "a b", "a b c", "a b c"]
    with pytest.raises(ValueError, match="differ in length"):
        tr.clean_parallel(["a"], [], 1, 175, 1.5)


def test_split_every_23rd() -> None:
    train, valid = tr.split_every([str(i) for i in range(1, 50)], 23)
    assert valid == ["23", "46"] and len(train) == 47 and "23" not in train


def test_tokenize_lowercase_and_bpe_round_trip() -> None:
    tokens = tr.lowercase(tr.moses_tokenize(["Das ist's, oder?"], "de"))
    # tokenizer.perl splits apostrophes off on both sides for German, and escapes them.
    assert tokens == ["das ist &apos; s , oder ?"]
    codes = tr.learn_joint_bpe(["lower lowest low"] * 5, ["newer newest new"] * 5, 10)
    segmented = tr.apply_bpe(codes, ["lowest newest"])[0]
    assert segmented.replace("@@ ", "") == "lowest newest"


# --- The whole script on a tiny archive in the IWSLT layout ------------------------


def write_iwslt_tree(root: Path) -> dict[str, int]:
    """de-en/ with train.tags and the five dev/test XML pairs; returns the expected sizes."""
    folder = root / "de-en"
    folder.mkdir(parents=True)
    words_de = ["haus", "baum", "katze", "hund", "auto", "buch", "stadt", "wasser"]
    words_en = ["house", "tree", "cat", "dog", "car", "book", "city", "water"]
    de, en = (
        ["<url>http://ted.com/x</url>", "<keywords>talks</keywords>", "<talkid>1</talkid>", "<title>Der Titel</title>"],
        ["<url>http://ted.com/x</url>", "<keywords>talks</keywords>", "<talkid>1</talkid>", "<title>The title</title>"],
    )
    for i in range(70):
        n = 3 + i % 5
        de.append(" ".join(words_de[(i + k) % 8] for k in range(n)).capitalize() + ".")
        en.append(" ".join(words_en[(i + k) % 8] for k in range(n)).capitalize() + ".")
    de.append("Haus Baum Katze Hund Auto Buch Stadt Wasser Haus Baum .")  # ratio 11:2 > 1.5: dropped
    en.append("House .")
    (folder / "train.tags.de-en.de").write_text("\n".join(de) + "\n")
    (folder / "train.tags.de-en.en").write_text("\n".join(en) + "\n")
    for name in tr.IWSLT14_TEST_SETS:
        for lang, words in (("de", words_de), ("en", words_en)):
            segs = "\n".join(f'<seg id="{k}"> {words[k]} {words[k + 1]} . </seg>' for k in (1, 2))
            (folder / f"{name}.de-en.{lang}.xml").write_text(f'<mteval>\n<doc docid="1">\n{segs}\n</doc>\n</mteval>\n')
    kept = 1 + 70  # the title stays as a sentence; url/keywords/talkid lines and the ratio pair go
    valid = kept // 23
    return {"train": kept - valid, "valid": valid, "test": 2 * len(tr.IWSLT14_TEST_SETS)}


def make_archive(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    sizes = write_iwslt_tree(tmp_path / "tree")
    archive = tmp_path / "de-en.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "de-en", arcname="de-en")
    return archive, sizes


def run_script(*args: object) -> subprocess.CompletedProcess:
    return run_repo_script("scripts/prepare_iwslt14.py", *args)


def test_prepares_an_iwslt_archive_end_to_end(tmp_path: Path) -> None:
    archive, sizes = make_archive(tmp_path)
    out = tmp_path / "prepared"
    expected = f"{sizes['train']},{sizes['valid']},{sizes['test']}"
    result = run_script(
        "--raw-dir", archive, "--out-dir", out, "--bpe-merges", 30, "--expected-sizes", expected, "--workers", 1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"sentence pairs: train {sizes['train']:,}, valid {sizes['valid']:,}, test {sizes['test']:,}" in result.stdout
    )
    train_en = (out / "train.en").read_text().splitlines()
    assert len(train_en) == sizes["train"] and "the title" in (out / "train.en").read_text().replace("@@ ", "")
    assert not any("<url>" in line or "house ." == line for line in train_en)  # meta line and ratio pair gone
    assert (out / "test.de").read_text().replace("@@ ", "").splitlines()[0] == "baum katze ."
    assert (out / "data-bin" / "train.de-en.de.bin").exists()
    assert json.loads((out / "manifest.json").read_text())["sizes"] == sizes
    again = run_script("--raw-dir", archive, "--out-dir", out, "--bpe-merges", 30, "--expected-sizes", expected)
    assert again.returncode == 0 and "already prepared" in again.stdout


def test_size_mismatch_fails_loudly_and_leaves_nothing_finished(tmp_path: Path) -> None:
    archive, _ = make_archive(tmp_path)
    out = tmp_path / "prepared"
    result = run_script("--raw-dir", archive, "--out-dir", out, "--bpe-merges", 30)  # canonical IWSLT sizes
    assert result.returncode == 2
    assert "differ from the expected {'train': 160239, 'valid': 7283, 'test': 6750}" in result.stderr
    assert not (out / "manifest.json").exists()


def test_corrupt_archive_is_reported(tmp_path: Path) -> None:
    archive, _ = make_archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[:200])
    result = run_script("--raw-dir", archive, "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and "not a readable .tgz archive" in result.stderr


def test_incomplete_tree_is_reported(tmp_path: Path) -> None:
    write_iwslt_tree(tmp_path / "tree")
    (tmp_path / "tree" / "de-en" / "IWSLT14.TED.tst2012.de-en.en.xml").unlink()
    result = run_script("--raw-dir", tmp_path / "tree", "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and "lacks IWSLT14.TED.tst2012.de-en.en.xml" in result.stderr


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path: Path) -> None:
    archive, _ = make_archive(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script("--raw-dir", archive, "--out-dir", blocker / "prepared", "--bpe-merges", 30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: cannot write the output folder {blocker / 'prepared'}" in result.stderr
    assert "sentence pairs" not in result.stdout  # it stopped before reading the data


def test_a_manifest_cut_short_is_not_taken_as_finished(tmp_path: Path) -> None:
    archive, sizes = make_archive(tmp_path)
    out = tmp_path / "prepared"
    args = (
        "--raw-dir",
        archive,
        "--out-dir",
        out,
        "--bpe-merges",
        30,
        "--workers",
        1,
        "--expected-sizes",
        f"{sizes['train']},{sizes['valid']},{sizes['test']}",
    )
    assert run_script(*args).returncode == 0
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])  # a crash while the manifest was written
    again = run_script(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already prepared" not in again.stdout and json.loads(manifest.read_text())["sizes"] == sizes
    assert not (out / "manifest.json.tmp").exists()


def test_multi30k_layout(tmp_path: Path) -> None:
    raw = tmp_path / "multi30k"
    raw.mkdir()
    for name, n in (("train", 40), ("val", 5), ("test_2016_flickr", 4)):
        for lang, text in (("de", "Ein Hund läuft im Park."), ("en", "A dog runs in the park.")):
            with gzip.open(raw / f"{name}.{lang}.gz", "wt") as f:
                f.write("\n".join(f"{text} {i}" for i in range(n)) + "\n")
    result = run_script(
        "--corpus",
        "multi30k",
        "--raw-dir",
        raw,
        "--out-dir",
        tmp_path / "out",
        "--bpe-merges",
        20,
        "--expected-sizes",
        "40,5,4",
        "--workers",
        1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "valid.de").read_text().replace("@@ ", "").splitlines()[
        0
    ] == "ein hund läuft im park . 0"


# --- Downloads: resume, checksum, offline ------------------------------------------


class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:  # noqa: N802
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    RangeHandler.payload = os.urandom(300_000)
    httpd = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/de-en.tgz", RangeHandler.payload
    httpd.shutdown()


def test_download_resumes_a_partial_file(server, tmp_path: Path) -> None:
    url, payload = server
    dest = tmp_path / "de-en.tgz"
    (tmp_path / "de-en.tgz.part").write_bytes(payload[:100_000])
    digest = hashlib.sha256(payload).hexdigest()
    assert prep.download(url, dest, digest) == dest
    assert dest.read_bytes() == payload and not (tmp_path / "de-en.tgz.part").exists()


def test_download_refetches_a_corrupt_file_and_rejects_a_bad_checksum(server, tmp_path: Path) -> None:
    url, payload = server
    dest = tmp_path / "de-en.tgz"
    dest.write_bytes(b"corrupt")
    prep.download(url, dest, hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    other = tmp_path / "other.tgz"
    with pytest.raises(prep.PreparationError, match="checksum mismatch"):
        prep.download(url, other, "0" * 64)
    assert not other.exists() and not (tmp_path / "other.tgz.part").exists()


def test_offline_download_says_how_to_supply_the_archive(tmp_path: Path) -> None:
    with pytest.raises(prep.PreparationError, match="--raw-dir"):
        prep.download("http://127.0.0.1:9/de-en.tgz", tmp_path / "de-en.tgz", None)
    assert not (tmp_path / "de-en.tgz").exists()
