"""Tokenizer.encode_iterable: the ids of `encode` on the whole text, from chunks cut anywhere, in memory that
does not grow with the text."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.tokenizer.bpe import EOT, Tokenizer, load_gpt2

# Pieces where a careless cut changes the pre-tokens: whitespace runs before a word, contractions,
# digit and punctuation runs, multi-byte characters, and the special token (whole or cut in two).
PIECES = [" ", "  ", "\n", "\n\n", "\t", "a", "Tom", " ran", "'s", "'ll", "123", "4", "!?", ".", "é", "日本",
          "😀", EOT, "<|endo", "ftext|>", "<|", "|>"]


@pytest.fixture(scope="module")
def gpt2(shared_dir) -> Tokenizer:
    return load_gpt2(shared_dir / "tiktoken-cache")


@pytest.fixture(scope="module")
def stories(shared_dir) -> str:
    return (shared_dir / "data/tinystories/TinyStories-valid-sample.txt").read_text(encoding="utf-8")[:100_000]


def cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(p % (len(text) + 1) for p in points)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=40), points=st.lists(st.integers(0, 400), max_size=12),
       block_chars=st.integers(1, 40))
def test_any_cut_gives_the_ids_of_the_whole_text(gpt2, parts, points, block_chars):
    text = "".join(parts)
    assert list(gpt2.encode_iterable(cut(text, points), block_chars)) == gpt2.encode(text)


def test_a_file_handle_gives_the_ids_of_the_whole_file(gpt2, stories, tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(stories.replace("\n\n", f"\n{EOT}\n"), encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        assert list(gpt2.encode_iterable(f, block_chars=4096)) == gpt2.encode(path.read_text(encoding="utf-8"))


def peak_bytes(tokenizer: Tokenizer, path: Path) -> tuple[int, int]:
    """(ids, peak bytes allocated) while encoding the file line by line; the ids are counted, not kept."""
    tracemalloc.start()
    try:
        with open(path, encoding="utf-8") as f:
            ids = sum(1 for _ in tokenizer.encode_iterable(f, block_chars=1 << 16))
        return ids, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_however_large_the_file(gpt2, stories, tmp_path):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(stories * 2, encoding="utf-8")
    large.write_text(stories * 16, encoding="utf-8")  # 1.6 MB
    gpt2.encode(stories)  # the pre-token cache holds these stories' words before either measurement
    (small_ids, small_peak), (large_ids, large_peak) = peak_bytes(gpt2, small), peak_bytes(gpt2, large)
    assert large_ids == 8 * small_ids
    # 8x the text, the same memory: one 64k-character block, its pre-tokens and its ids (~620 kB measured),
    # where the list `encode` returns for the whole 1.6 MB text alone takes ~3 MB (8 bytes a pointer per id).
    assert large_peak < 1.2 * small_peak + (64 << 10), (small_peak, large_peak)
    assert large_peak < 1 << 20, large_peak
