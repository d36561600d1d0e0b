"""Data pipeline: sources, normalization, splits, leakage, manifests."""

from __future__ import annotations

import json

import pytest

from scratchlm.data import Dataset, LeakageError, check_leakage, prepare_dataset
from scratchlm.data.normalize import InvalidUTF8, NormalizationReport, normalize_text
from scratchlm.data.prepare import split_documents
from scratchlm.downloads import SOURCES, SourceUnavailable, fetch


def test_shared_data_matches_canonical_checksums(shakespeare_text, names):
    assert len(shakespeare_text.encode()) == 1_115_394
    assert len(names) == 32_033
    assert fetch("shakespeare").name == SOURCES["shakespeare"].filename


def test_offline_error_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCRATCHLM_LOCAL_DATA", str(tmp_path / "empty"))
    with pytest.raises(SourceUnavailable) as err:
        fetch("shakespeare", download=False)
    msg = str(err.value)
    assert str(tmp_path / "cache" / "tinyshakespeare.txt") in msg
    assert SOURCES["shakespeare"].sha256 in msg and "SCRATCHLM_LOCAL_DATA" in msg


def test_mirror_with_wrong_bytes_is_not_used(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "names.txt").write_text("not the real file\n")
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCRATCHLM_LOCAL_DATA", str(mirror))
    with pytest.raises(SourceUnavailable):
        fetch("names", download=False)
    assert not (tmp_path / "cache" / "names.txt").exists()


def test_normalization_reports_every_change():
    report = NormalizationReport()
    text = "a\r\nb\rc\u0065\u0301 \n\n\n\nd  "
    out = normalize_text(text, report, clean_whitespace=True)
    assert out == "a\nb\nc\u00e9\n\nd"
    assert report.crlf_to_lf == 1 and report.cr_to_lf == 1
    assert report.nfc_changed_documents == 1 and report.nfc_characters_delta == -1
    assert report.blank_line_runs_collapsed == 1 and report.trailing_whitespace_stripped >= 1
    plain = NormalizationReport()
    assert normalize_text(text, plain) == "a\nb\nc\u00e9 \n\n\n\nd  "  # no whitespace clean-up unless asked


def test_bom_and_invalid_utf8(tmp_path):
    good = tmp_path / "bom.txt"
    good.write_bytes(b"\xef\xbb\xbfhello world\n" * 3)
    ds, _ = prepare_dataset(str(good), tmp_path / "bom")
    assert ds.manifest["decoding"]["bom_removed"] == 1
    assert not ds.text("train").startswith("\ufeff")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 10 + b"\xff\xfe broken")
    with pytest.raises(InvalidUTF8, match=r"bad.txt: invalid UTF-8 at byte offset 100"):
        prepare_dataset(str(bad), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing half-written
    ds, _ = prepare_dataset(str(bad), tmp_path / "bad", errors="replace")
    assert ds.manifest["decoding"]["invalid_sequences_replaced"] >= 1


def test_single_document_splits_contiguously_like_nanogpt(tmp_path, shakespeare_text):
    ds, written = prepare_dataset("shakespeare", tmp_path / "shakespeare")
    assert written
    train, val, test = (ds.text(s) for s in ("train", "val", "test"))
    assert train + val + test == shakespeare_text
    n = len(shakespeare_text)
    assert len(train) == int(0.9 * n) and len(train) + len(val) == int(0.95 * n)
    # nanoGPT's validation text (the last 10%) is our val + test, exactly.
    assert val + test == shakespeare_text[int(0.9 * n) :]
    m = json.loads((tmp_path / "shakespeare" / "manifest.json").read_text())
    assert m["format"] == "scratchlm.dataset" and m["version"] == 1
    assert m["source"]["sha256"] == SOURCES["shakespeare"].sha256
    assert m["splits"]["train"]["characters"] == len(train)


def test_prepare_twice_is_a_noop_and_detects_changes(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(f"line {i}" for i in range(100)))
    _, first = prepare_dataset(str(src), tmp_path / "out", documents="lines")
    mtime = (tmp_path / "out" / "train.jsonl").stat().st_mtime_ns
    _, second = prepare_dataset(str(src), tmp_path / "out", documents="lines")
    assert first and not second
    assert (tmp_path / "out" / "train.jsonl").stat().st_mtime_ns == mtime
    src.write_text("\n".join(f"line {i}" for i in range(101)))
    _, third = prepare_dataset(str(src), tmp_path / "out", documents="lines")
    assert third
    (tmp_path / "out" / "val.jsonl").write_text('{"text": "tampered"}\n')
    with pytest.raises(ValueError, match="sha256 does not match the manifest"):
        Dataset.load(tmp_path / "out").documents("val")
    _, fourth = prepare_dataset(str(src), tmp_path / "out", documents="lines")
    assert fourth  # a modified split is detected and rebuilt


def test_duplicates_stay_in_one_split_and_split_is_seeded(names):
    splits = split_documents(names, (0.9, 0.05, 0.05), seed=1337)
    report = check_leakage(splits)  # raises on any leak
    assert report["shared_documents"] == 0 and report["duplicates_within_splits"] > 0
    sizes = [len(splits[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == len(names)
    assert abs(sizes[0] / len(names) - 0.9) < 0.01 and sizes[1] > 0 and sizes[2] > 0
    assert split_documents(names, (0.9, 0.05, 0.05), seed=1337) == splits
    assert split_documents(names, (0.9, 0.05, 0.05), seed=7) != splits


def test_leakage_check_fails_on_a_leaking_split():
    leaking = {"train": ["alpha", "beta", "gamma"], "val": ["delta", "beta"], "test": ["epsilon"]}
    with pytest.raises(LeakageError, match=r"train/val.*1"):
        check_leakage(leaking)


def test_jsonl_and_folder_sources(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"document number {i}"}) for i in range(40)) + "\n")
    ds, _ = prepare_dataset(str(jsonl), tmp_path / "j", text_field="body")
    assert sum(ds.manifest["splits"][s]["documents"] for s in ("train", "val", "test")) == 40
    with pytest.raises(ValueError, match="string field 'text'"):
        prepare_dataset(str(jsonl), tmp_path / "j2")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(10):
        (folder / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (folder / "empty.txt").write_text("")
    ds, _ = prepare_dataset(str(folder), tmp_path / "f")
    assert ds.manifest["normalization"]["empty_documents_skipped"] == 1
    assert ds.manifest["normalization"]["documents_out"] == 10


def test_stdlib_source_is_an_offline_corpus(tmp_path):
    ds, _ = prepare_dataset("stdlib", tmp_path / "stdlib", max_bytes=300_000)
    assert ds.manifest["source"]["kind"] == "stdlib"
    assert ds.manifest["splits"]["train"]["documents"] > ds.manifest["splits"]["val"]["documents"] > 0
    assert "def " in ds.text("train")
