"""The encode_shards engine gives exactly the from-scratch encoder's ids (and GPT-2's, with GPT-2's merges)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.tokenizer.bpe import EOT, Tokenizer, load_gpt2
from tinylm.tokenizer.train import train_bpe
from tinylm.corpus.formats import iter_eot_stories
from tinylm.corpus.parallel import chunks
from tinylm.tokenizer.fast_encode import (DocumentEncoder, ParallelEncoder, check_against_reference, tiktoken_ranks)

VALID = "data/tinystories/TinyStories-valid-sample.txt"
TRAIN = "data/tinystories/TinyStories-train-sample.txt"


@pytest.fixture(scope="session", params=[512, 4096], ids=lambda v: f"vocab{v}")
def trained(request, shared_dir: Path) -> Tokenizer:
    vocab, merges = train_bpe(shared_dir / TRAIN, request.param, [EOT])
    return Tokenizer(vocab, merges, [EOT])


@pytest.fixture(scope="session")
def val_documents(shared_dir: Path) -> list[str]:
    return list(iter_eot_stories(shared_dir / VALID))


def reference_ids(tokenizer: Tokenizer, documents: list[str]) -> np.ndarray:
    return np.array([i for doc in documents for i in [*tokenizer.encode(doc), tokenizer.eot_id]], dtype=np.int64)


def test_engine_equals_from_scratch_on_the_whole_validation_split(trained: Tokenizer, val_documents: list[str]) -> None:
    encoder = DocumentEncoder(trained)
    assert encoder.uses_tiktoken  # trained merges export exactly, so this is tiktoken's core at work
    batch = encoder.encode_documents(val_documents)
    expected = reference_ids(trained, val_documents)
    assert batch.ids.dtype == np.uint16 and batch.ids.size == expected.size
    np.testing.assert_array_equal(batch.ids, expected)
    assert batch.documents == len(val_documents) > 1000
    assert batch.text_bytes == sum(len(doc.encode()) for doc in val_documents)
    assert check_against_reference(trained, val_documents, batch.ids, "val") == len(val_documents)


def test_parallel_engine_keeps_document_order(trained: Tokenizer, val_documents: list[str]) -> None:
    documents = val_documents[:600]
    with ParallelEncoder(trained, workers=2) as encoder:
        batches = list(encoder.map(chunks(documents, chunk_chars=20_000)))
    assert len(batches) > 8  # several rounds of the in-flight window
    assert sum(b.documents for b in batches) == len(documents)
    np.testing.assert_array_equal(np.concatenate([b.ids for b in batches]), reference_ids(trained, documents))


def test_gpt2_merges_export_to_tiktokens_own_ranks_and_ids(shared_dir: Path, val_documents: list[str]) -> None:
    gpt2 = load_gpt2(shared_dir / "tiktoken-cache")
    reference = tiktoken.get_encoding("gpt2")
    # GPT-2 numbers its 256 bytes in another order than ours: ids still have to come out right.
    assert tiktoken_ranks(gpt2) == reference._mergeable_ranks
    ids = DocumentEncoder(gpt2).encode_documents(val_documents).ids
    expected = [i for doc in val_documents for i in [*reference.encode_ordinary(doc), reference.eot_token]]
    np.testing.assert_array_equal(ids, expected)


OVERLAPPING_SPECIALS = [EOT, EOT + EOT, "<|pad|>"]


@pytest.fixture(scope="session")
def with_specials(trained: Tokenizer) -> tuple[Tokenizer, DocumentEncoder]:
    tokenizer = Tokenizer(trained.vocab, trained.merges, OVERLAPPING_SPECIALS)
    return tokenizer, DocumentEncoder(tokenizer)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from([*OVERLAPPING_SPECIALS, "<|endof", "|>", " 's"])),
                max_size=8))
def test_engine_equals_from_scratch_on_arbitrary_text(with_specials, parts: list[str]) -> None:
    tokenizer, encoder = with_specials
    text = "".join(parts)
    assert encoder.encode_document(text) == [*tokenizer.encode(text), tokenizer.eot_id]


def test_tokenizer_tiktoken_would_get_wrong_falls_back_to_ours() -> None:
    # Two merges make "abc" (ab+c, then a+bc). tiktoken ranks tokens, not merges, so it would rank
    # a+bc as high as ab+c: on "abcd" = [a, bc, d] it then picks a+bc over bc+d, which comes first
    # in our merges. The engine must see this and use Tokenizer.encode instead.
    ids = {b"bc": 256, b"ab": 257, b"abc": 258, b"bcd": 259}
    vocab = {b: bytes([b]) for b in range(256)} | {i: token for token, i in ids.items()} | {260: EOT.encode()}
    merges = [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c"), (b"bc", b"d"), (b"a", b"bc")]
    tokenizer = Tokenizer(vocab, merges, [EOT])
    assert tokenizer.encode("abcd") == [ord("a"), ids[b"bcd"]]
    naive = tiktoken.Encoding("naive", pat_str=tokenizer.pattern, special_tokens={},
                              mergeable_ranks={token: i for i, token in vocab.items() if i < 260})
    assert naive.encode_ordinary("abcd") == [ids[b"abc"], ord("d")]

    assert tiktoken_ranks(tokenizer) is None
    encoder = DocumentEncoder(tokenizer)
    assert not encoder.uses_tiktoken
    for text in ["abcd", "aabcdbc abcabcd", "cab ab bc", ""]:
        assert encoder.encode_document(text) == [*tokenizer.encode(text), 260]


def test_reference_check_catches_a_single_wrong_id(trained: Tokenizer, val_documents: list[str]) -> None:
    documents = val_documents[:50]
    ids = DocumentEncoder(trained).encode_documents(documents).ids.copy()
    ids[ids.size // 2] = (ids[ids.size // 2] + 1) % trained.vocab_size
    with pytest.raises(RuntimeError, match="document"):
        check_against_reference(trained, documents, ids, "val")
    good = DocumentEncoder(trained).encode_documents(documents).ids
    with pytest.raises(RuntimeError, match="more ids"):
        check_against_reference(trained, documents, np.append(good, 5), "val")


def test_batches_cover_documents_in_order() -> None:
    documents = [f"story {i} " * (i % 7) for i in range(100)]
    batches = list(chunks(documents, chunk_chars=50))
    assert [doc for batch in batches for doc in batch] == documents
    assert all(sum(map(len, batch)) >= 50 for batch in batches[:-1])
