"""The shard format: header round trip, every corruption (header or payload) is a clear error, splits reassemble."""
from __future__ import annotations

import hashlib
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.corpus.shards import (HEADER_BYTES, MAGIC, ShardError, load_split, payload_checksum, read_header,
                                  read_shard, remove_stale_shards, shard_path, write_shard, write_split)
from tinylm.errors import PipelineError

FINGERPRINT = hashlib.sha256(b"tokenizer A").hexdigest()
OTHER_FINGERPRINT = hashlib.sha256(b"tokenizer B").hexdigest()
VOCAB = 4096


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=5000)


@pytest.fixture
def shard(tmp_path: Path, tokens: np.ndarray) -> Path:
    path = tmp_path / "train_0000.bin"
    write_shard(path, tokens, VOCAB, FINGERPRINT)
    return path


def test_header_and_tokens_round_trip(shard: Path, tokens: np.ndarray) -> None:
    header = read_header(shard)
    assert (header.token_count, header.vocab_size, header.tokenizer_fingerprint) == (5000, VOCAB, FINGERPRINT)
    assert header.version == 2
    assert header.checksum == payload_checksum(tokens).hex() != payload_checksum(tokens[1:]).hex()
    assert shard.stat().st_size == HEADER_BYTES + 2 * tokens.size
    ids = read_shard(shard, FINGERPRINT)
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, tokens)
    with pytest.raises(ValueError):  # read-only map: a reader cannot corrupt the shard
        ids[0] = 1


def test_largest_vocab_keeps_the_top_id(tmp_path: Path) -> None:
    ids = np.array([0, 65534, 7])
    write_shard(tmp_path / "s.bin", ids, 65535, FINGERPRINT)
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin"), ids)


def _rewrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "magic": (lambda p: _rewrite(p, 0, b"GARBAGE!"), "not a token shard"),
    "version 1": (lambda p: _rewrite(p, len(MAGIC), struct.pack("<I", 1)),
                  "format version 1 (older code: shards without a payload checksum), this code reads version 2"),
    "version 3": (lambda p: _rewrite(p, len(MAGIC), struct.pack("<I", 3)), "format version 3, this code reads"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated"),
    "extra bytes": (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "extra bytes"),
    "header cut short": (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than the 1024-byte header"),
    "dirty padding": (lambda p: _rewrite(p, HEADER_BYTES - 1, b"\x01"), "corrupt header"),
    "count overwritten": (lambda p: _rewrite(p, 20, struct.pack("<Q", 10**6)), "truncated"),
    # The payload: an id past the vocabulary gets its own name (it would index past the embedding), any
    # other changed byte fails the checksum.
    "ids past the vocabulary": (lambda p: _rewrite(p, HEADER_BYTES + 2 * 1000, b"\xff" * 10),
                                "token id 65535 at position 1000 is outside the tokenizer's vocabulary (4096 ids)"),
    "an id changed": (lambda p: _rewrite(p, HEADER_BYTES + 2 * 4321, struct.pack("<H", 4095)),
                      "its ids do not match the header's checksum"),
    "checksum overwritten": (lambda p: _rewrite(p, 64, b"\0" * 8), "its ids do not match the header's checksum"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corruption_is_a_clear_error(shard: Path, case: str) -> None:
    corrupt, expected = CORRUPTIONS[case]
    corrupt(shard)
    with pytest.raises(ShardError) as info:
        read_shard(shard)
    message = str(info.value)
    assert expected in message and str(shard) in message and "dvc repro encode_shards" in message
    assert isinstance(info.value, PipelineError)  # stages print it as one line, exit code 2


def test_an_old_format_shard_names_the_rewrite(tmp_path: Path, tokens: np.ndarray) -> None:
    # Version 1 as the code before payload checksums wrote it: the header without the checksum field.
    path = tmp_path / "val_0000.bin"
    header = struct.pack("<8sI8sQI32s", MAGIC, 1, b"<u2", tokens.size, VOCAB, bytes.fromhex(FINGERPRINT))
    path.write_bytes(header.ljust(HEADER_BYTES, b"\0") + tokens.astype("<u2").tobytes())
    with pytest.raises(ShardError, match=r"val_0000\.bin: shard format version 1 \(older code: shards without a "
                                         r"payload checksum\), this code reads version 2\. Fix: rerun `dvc repro "
                                         r"encode_shards` to rewrite the shards"):
        load_split(tmp_path, "val", FINGERPRINT)


def test_ids_past_the_vocabulary_are_named_even_under_a_matching_checksum(tmp_path: Path) -> None:
    # A shard from another writer, its checksum right but its ids beyond the vocabulary the header gives.
    ids = np.array([5, 4096, 7], dtype="<u2")
    header = struct.pack("<8sI8sQI32s8s", MAGIC, 2, b"<u2", ids.size, VOCAB, bytes.fromhex(FINGERPRINT),
                         payload_checksum(ids))
    (tmp_path / "s.bin").write_bytes(header.ljust(HEADER_BYTES, b"\0") + ids.tobytes())
    with pytest.raises(ShardError, match=r"token id 4096 at position 1 is outside the tokenizer's vocabulary"):
        read_shard(tmp_path / "s.bin")


def test_other_tokenizer_is_refused(shard: Path) -> None:
    with pytest.raises(ShardError, match="tokenizer in use") as info:
        read_shard(shard, OTHER_FINGERPRINT)
    assert str(shard) in str(info.value)
    assert read_shard(shard, FINGERPRINT).size == 5000


@pytest.mark.parametrize("vocab_size", [65536, 100_000])
def test_vocab_beyond_uint16_is_refused(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(ShardError, match="tokenizer.vocab_size"):
        write_shard(tmp_path / "s.bin", np.array([1, 2]), vocab_size, FINGERPRINT)
    with pytest.raises(ShardError, match="tokenizer.vocab_size"):
        write_split(tmp_path, "train", [np.array([1, 2])], 1024, vocab_size, FINGERPRINT)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [[-1, 3], [3, VOCAB], [70000]])
def test_out_of_range_ids_are_refused_not_wrapped(tmp_path: Path, bad: list[int]) -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 4096\)"):
        write_shard(tmp_path / "s.bin", np.array(bad), VOCAB, FINGERPRINT)
    with pytest.raises(ValueError, match=r"must be in \[0, 4096\)"):
        write_split(tmp_path, "val", [np.array([1]), np.array(bad)], 1024, VOCAB, FINGERPRINT)


def test_malformed_fingerprint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        write_shard(tmp_path / "s.bin", np.array([1]), VOCAB, "abc")


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), max_size=12), shard_tokens=st.integers(1, 500))
def test_split_reassembles_to_the_same_stream(sizes: list[int], shard_tokens: int) -> None:
    rng = np.random.default_rng(len(sizes) * 1000 + shard_tokens)
    chunks = [rng.integers(0, VOCAB, size=n).astype(np.uint16) for n in sizes]
    stream = np.concatenate([np.zeros(0, np.uint16), *chunks])
    with tempfile.TemporaryDirectory() as tmp:
        counts = write_split(tmp, "train", iter(chunks), shard_tokens, VOCAB, FINGERPRINT)
        assert sum(counts) == stream.size
        assert all(count == shard_tokens for count in counts[:-1]) and all(0 < c <= shard_tokens for c in counts)
        if stream.size == 0:
            with pytest.raises(ShardError, match="no train_NNNN.bin shards"):
                load_split(tmp, "train")
        else:
            shards = load_split(tmp, "train", FINGERPRINT)
            assert len(shards) == len(counts)
            np.testing.assert_array_equal(np.concatenate(shards), stream)


def test_split_names_do_not_mix(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [np.arange(10)], 4, VOCAB, FINGERPRINT)
    write_split(tmp_path, "val", [np.arange(20, 25)], 4, VOCAB, FINGERPRINT)
    np.testing.assert_array_equal(np.concatenate(load_split(tmp_path, "train")), np.arange(10))
    np.testing.assert_array_equal(np.concatenate(load_split(tmp_path, "val")), np.arange(20, 25))


def test_missing_shard_in_the_middle_is_an_error(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [np.arange(30)], 10, VOCAB, FINGERPRINT)
    shard_path(tmp_path, "train", 1).unlink()
    with pytest.raises(ShardError, match=r"train_0001\.bin: missing"):
        load_split(tmp_path, "train")


def test_split_must_not_mix_tokenizers(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [np.arange(30)], 10, VOCAB, FINGERPRINT)
    write_shard(shard_path(tmp_path, "train", 2), np.arange(10), VOCAB, OTHER_FINGERPRINT)
    with pytest.raises(ShardError, match="tokenizer in use"):
        load_split(tmp_path, "train")
    with pytest.raises(ShardError, match="tokenizer in use"):
        load_split(tmp_path, "train", OTHER_FINGERPRINT)


def test_missing_directory_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="dvc repro encode_shards"):
        load_split(tmp_path / "nowhere", "val")


def test_remove_stale_shards_keeps_other_files(tmp_path: Path) -> None:
    write_split(tmp_path, "train", [np.arange(30)], 10, VOCAB, FINGERPRINT)
    write_split(tmp_path, "val", [np.arange(5)], 10, VOCAB, FINGERPRINT)
    (tmp_path / ".train_0003.bin.k2j3h.tmp").write_bytes(b"torn")
    (tmp_path / "notes.txt").write_text("keep me")
    removed = remove_stale_shards(tmp_path)
    assert len(removed) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
