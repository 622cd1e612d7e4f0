"""The download stage: source resolution (fast offline), every source format, provenance."""
from __future__ import annotations

import copy
import re
import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from tinylm.corpus import formats, sources
from tinylm.config import SplitFiles, parse_params
from tinylm.errors import PipelineError
from tinylm.files import sha256_file
from tinylm.records.download import Provenance
from tinylm.records.io import read_record


@pytest.fixture
def data_params(repo_root, shared_dir):
    def make(sources, **changes):
        raw = yaml.safe_load((repo_root / "params.yaml").read_text())
        section = copy.deepcopy(raw["data"])
        section.update(sources=sources, **changes)
        raw["data"] = section
        return parse_params(raw).data
    return make


@pytest.fixture
def unreachable_hub(monkeypatch):
    # Port 9 on localhost: connection refused at once, as when offline.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_unreachable_hub_falls_back_fast(data_params, shared_dir, unreachable_hub):
    params = data_params(["roneneldan/TinyStories", str(shared_dir / "data/tinystories")])
    started = time.perf_counter()
    source, skipped = sources.resolve_source(params)
    assert time.perf_counter() - started < 5
    assert source.kind == "folder"
    assert "unreachable" in skipped[0] and "data.sources[0]" in skipped[0]


def test_unreachable_hub_alone_names_the_param(data_params, unreachable_hub):
    with pytest.raises(PipelineError, match=r"data\.sources"):
        sources.resolve_source(data_params(["roneneldan/TinyStories"]))


def test_hub_probe_times_out_on_a_silent_host(monkeypatch):
    # A host that accepts the connection and never answers (as some proxies do): the probe must
    # give up within its timeout instead of hanging.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        # Neither HF_HUB_OFFLINE nor HF_DATASETS_OFFLINE is set (conftest's hermetic_environment clears both).
        started = time.perf_counter()
        revision, reason = sources.probe_hub("roneneldan/TinyStories", 0.5)
        assert revision is None and "no answer" in reason
        assert time.perf_counter() - started < 3


def test_offline_env_skips_the_hub_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in sources.probe_hub("roneneldan/TinyStories", 5)[1]


def test_missing_paths_are_skipped(data_params, tmp_path, shared_dir):
    params = data_params([str(tmp_path / "nope"), {"train": str(tmp_path / "a.txt"), "validation": "b"},
                          str(shared_dir / "data/tinystories")])
    source, skipped = sources.resolve_source(params)
    assert source.kind == "folder" and len(skipped) == 2
    assert "file not found" in skipped[1]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_eot_format_with_crlf(tmp_path):
    path = write(tmp_path / "s.txt", "One.\r\nTwo lines.\r\n<|endoftext|>\r\nSecond story.\r\n<|endoftext|>\r\n")
    assert list(formats.iter_file_stories(path, re.compile("x"))) == ["One.\nTwo lines.", "Second story."]


def test_eot_format_keeps_last_story_without_separator(tmp_path):
    path = write(tmp_path / "s.txt", "A.\n<|endoftext|>\nB is cut off")
    assert list(formats.iter_eot_stories(path)) == ["A.", "B is cut off"]


def test_blankline_format_splits_on_story_openers(tmp_path):
    text = ("tail of a story.\n\nOnce upon a time, a cat.\n\nThe cat slept.\n\n\n"
            "Once there was a dog.\n\nThe dog ran.\n")
    path = write(tmp_path / "b.txt", text)
    opener = re.compile(r"^(Once upon a time|Once there was)")
    assert list(formats.iter_file_stories(path, opener)) == [
        "tail of a story.", "Once upon a time, a cat.\n\nThe cat slept.", "Once there was a dog.\n\nThe dog ran."]


def test_jsonl_format_and_its_errors(tmp_path):
    good = write(tmp_path / "g.jsonl", '{"text": "a"}\n\n{"text": "b\\nc"}\n')
    assert list(formats.iter_file_stories(good, re.compile("x"))) == ["a", "b\nc"]
    bad = write(tmp_path / "b.jsonl", '{"text": "a"}\n{"story": "b"}\n')
    with pytest.raises(PipelineError, match=r"b\.jsonl:2"):
        list(formats.iter_file_stories(bad, re.compile("x")))


def test_non_utf8_names_file_and_offset(tmp_path):
    path = write(tmp_path / "latin1.txt", "caf".encode() + b"\xe9 ok\n<|endoftext|>\n")
    with pytest.raises(PipelineError, match=r"latin1\.txt: not valid UTF-8 at byte 3"):
        formats.iter_file_stories(path, re.compile("x"))


def test_ten_megabyte_line_is_read_whole(tmp_path):
    line = "word " * 2_000_000
    path = write(tmp_path / "big.txt", f"{line}\n<|endoftext|>\nShort.\n<|endoftext|>\n")
    stories = list(formats.iter_file_stories(path, re.compile("x")))
    assert [len(s) for s in stories] == [len(line), 6]


def test_empty_file_is_a_clear_error(data_params, tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    params = data_params([{"train": str(empty), "validation": str(empty)}])
    with pytest.raises(PipelineError, match="no stories"):
        sources.download(params, tmp_path / "raw", log=lambda _: None)


def test_download_from_the_offline_folder(data_params, shared_dir, tmp_path, unreachable_hub):
    params = data_params(["roneneldan/TinyStories", str(shared_dir / "data/tinystories")],
                         max_train_stories=50, max_val_stories=20)
    record = sources.download(params, tmp_path / "raw", log=lambda _: None)
    assert record.kind == "folder" and record.splits.train.stories == 50
    lines = (tmp_path / "raw/val.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0])["text"].startswith("Once upon a time")
    assert record.splits.val.sha256 == sha256_file(tmp_path / "raw/val.jsonl")
    # What the report reads back is what download returned.
    assert read_record(tmp_path / "raw/provenance.json", Provenance, "download") == record
    # Same source and caps: byte-identical outputs.
    first = (tmp_path / "raw/train.jsonl").read_bytes()
    sources.download(params, tmp_path / "raw", log=lambda _: None)
    assert (tmp_path / "raw/train.jsonl").read_bytes() == first


def test_download_from_official_and_messy_text_files(data_params, shared_dir, tmp_path):
    tiny = shared_dir / "data/tinystories"
    params = data_params([{"train": str(tiny / "TinyStories-train-sample.txt"),
                           "validation": str(tiny / "messy/TinyStories-valid-v1-mojibake.txt")}])
    record = sources.download(params, tmp_path / "raw", log=lambda _: None)
    assert record.kind == "files" and set(record.source_sha256) == {"train", "val"}
    assert record.splits.train.stories == 5317
    # ~800 stories in the first 0.8 MB of V1 validation, found by their openers.
    assert 600 < record.splits.val.stories < 1100


def test_source_change_changes_provenance(data_params, shared_dir, tmp_path):
    tiny = shared_dir / "data/tinystories"
    folder = sources.download(data_params([str(tiny)], max_train_stories=5, max_val_stories=5),
                           tmp_path / "a", log=lambda _: None)
    files = sources.download(data_params([{"train": str(tiny / "TinyStories-train-sample.txt"),
                                        "validation": str(tiny / "TinyStories-valid-sample.txt")}],
                                      max_train_stories=5, max_val_stories=5), tmp_path / "b", log=lambda _: None)
    assert folder.source != files.source
    assert (tmp_path / "a/provenance.json").read_bytes() != (tmp_path / "b/provenance.json").read_bytes()


def test_split_files_type_is_exported():
    assert SplitFiles(train="a", validation="b").train == "a"
