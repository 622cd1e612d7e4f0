"""The from-scratch tokenizer: GPT-2 equality, round trips, streaming, files, bad input."""
from __future__ import annotations

import json

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.tokenizer.bpe import EOT, Tokenizer, TokenizerError, load_gpt2, load_tokenizer
from tinylm.tokenizer.train import train_bpe
from tinylm.tokenizer.pretokenize import PRETOKEN_RE, PreTokenizer

DOUBLE_EOT = EOT + EOT
GPT2_EDGE_CASES = [
    "", "a", " ", "\n", "é", "€", "😀", "👩‍👩‍👧‍👦", "日本語のテキスト", "中文分词测试",
    "Grüße aus Köln: Straße, Fußgänger, Äpfel!", "   ", "\n\n\n", "\t \t", "a  b   c    ",
    "  leading and trailing  ", "line\n  indented\n\tTabbed", "I'll we've they're it's I'd I'm",
    "HELLO'S 'quoted' 12345 3.14159 1,000,000", f"story one{EOT}story two{EOT}", EOT, f"{EOT}{EOT} x",
    "\u00a0non-breaking\u2003spaces", "mixed 😀 emoji 🎉🎉 runs", "\r\nwindows\r\n",
]


@pytest.fixture(scope="module")
def gpt2(shared_dir) -> Tokenizer:
    return load_gpt2(shared_dir / "tiktoken-cache")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def valid_text(shared_dir) -> str:
    return (shared_dir / "data/tinystories/TinyStories-valid-sample.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_dir) -> Tokenizer:
    """Our BPE trained on ~300 kB of stories, with two overlapping special tokens."""
    text = (shared_dir / "data/tinystories/TinyStories-train-sample.txt").read_text(encoding="utf-8")[:300_000]
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(text, encoding="utf-8")
    vocab, merges = train_bpe(path, 600, [EOT, DOUBLE_EOT])
    return Tokenizer(vocab, merges, [EOT, DOUBLE_EOT])


# ------------------------------------------------------------------ GPT-2 equality


def test_gpt2_ids_equal_tiktoken_on_the_whole_validation_text(gpt2, tiktoken_gpt2, valid_text):
    assert EOT in valid_text
    assert gpt2.encode(valid_text) == tiktoken_gpt2.encode(valid_text, allowed_special={EOT})


@pytest.mark.parametrize("text", GPT2_EDGE_CASES)
def test_gpt2_ids_equal_tiktoken_on_edge_cases(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special={EOT})


def test_gpt2_ids_equal_tiktoken_on_every_single_character_class(gpt2, tiktoken_gpt2):
    chars = [chr(c) for c in [*range(0, 0x250), 0x3000, 0x4E00, 0xAC00, 0x1F600, 0x10FFFF - 2]]
    for char in chars:
        assert gpt2.encode(char) == tiktoken_gpt2.encode(char), repr(char)


def test_gpt2_special_token_and_vocab(gpt2, tiktoken_gpt2):
    assert gpt2.vocab_size == tiktoken_gpt2.n_vocab == 50257
    assert gpt2.eot_id == tiktoken_gpt2.eot_token == 50256
    assert len(gpt2.merges) == 50000


# ------------------------------------------------------------------ round trips


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(small, gpt2, text):
    assert small.decode(small.encode(text)) == text
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from([EOT, DOUBLE_EOT, "<|", "|>", "<|endoftext"]))))
def test_round_trip_with_special_tokens(small, parts):
    text = "".join(parts)
    ids = small.encode(text)
    assert small.decode(ids) == text
    assert ids.count(small.special_tokens[EOT]) + 2 * ids.count(small.special_tokens[DOUBLE_EOT]) == text.count(EOT)


def test_special_tokens_are_never_split_and_longest_wins(small):
    single, double = small.special_tokens[EOT], small.special_tokens[DOUBLE_EOT]
    assert small.encode(EOT) == [single]
    assert small.encode(DOUBLE_EOT) == [double]
    assert small.encode(EOT * 3) == [double, single]
    ids = small.encode(f"The end.{DOUBLE_EOT}Once")
    assert double in ids and single not in ids
    assert small.decode(ids[: ids.index(double)]) == "The end."


def test_a_tokenizer_without_special_tokens_encodes_them_as_text(small):
    plain = Tokenizer({i: t for i, t in small.vocab.items() if i not in small.special_tokens.values()},
                      small.merges)
    ids = plain.encode(EOT)
    assert len(ids) > 1 and plain.decode(ids) == EOT
    with pytest.raises(ValueError, match="no <|endoftext|>"):
        plain.eot_id


def test_decode_replaces_invalid_utf8_and_rejects_unknown_ids(small):
    euro = small.encode("€")  # three bytes; their ids alone are a broken character
    first_byte = [i for i, token in small.vocab.items() if token == "€".encode()[:1]]
    assert small.decode(first_byte) == "\ufffd"
    assert small.decode(euro) == "€"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.decode([small.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.decode([-1])


def _pieces(pretokenizer: PreTokenizer, text: str) -> list[str]:
    out = []
    for index, part in enumerate(pretokenizer.split_specials(text)):
        out.extend([part] if index % 2 else PRETOKEN_RE.findall(part))
    return out


# Text rich in the places where a cut could go wrong: whitespace runs, contractions, specials.
_tricky = st.lists(st.sampled_from(["a", "b", " ", "  ", "\n", "\t", "'", "ll", "s", "7", ".", "é", "😀",
                                    EOT, DOUBLE_EOT, "<|", "endoftext", "|>", "<|endoftext"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_tricky, st.lists(st.integers(0, 60), max_size=8), st.integers(1, 12))
def test_blocks_cut_only_where_pretokens_do_not_change(parts, cuts, block_chars):
    text = "".join(parts)
    pretokenizer = PreTokenizer([EOT, DOUBLE_EOT])
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    blocks = list(pretokenizer.blocks(chunks, block_chars))
    assert "".join(blocks) == text
    assert [p for block in blocks for p in _pieces(pretokenizer, block)] == _pieces(pretokenizer, text)


# ------------------------------------------------------------------ files


def test_save_and_load_round_trip(small, tmp_path, valid_text):
    small.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.vocab == small.vocab and loaded.merges == small.merges
    assert loaded.special_tokens == small.special_tokens
    assert loaded.fingerprint == small.fingerprint
    assert loaded.encode(valid_text[:50_000]) == small.encode(valid_text[:50_000])
    meta = json.loads((tmp_path / "tok/tokenizer.json").read_text())
    assert meta["vocab_size"] == small.vocab_size and meta["fingerprint"] == small.fingerprint
    small.save(tmp_path / "tok")  # replacing an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_fingerprint_tells_tokenizers_apart(small):
    assert Tokenizer(small.vocab, small.merges[:-1], [EOT, DOUBLE_EOT]).fingerprint != small.fingerprint
    assert Tokenizer(small.vocab, small.merges, [EOT]).fingerprint != small.fingerprint
    assert Tokenizer(small.vocab, small.merges, [EOT, DOUBLE_EOT]).fingerprint == small.fingerprint


def test_load_rejects_tampered_or_missing_files(small, tmp_path):
    small.save(tmp_path / "tok")
    merges = tmp_path / "tok/merges.txt"
    lines = merges.read_text().splitlines()
    merges.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    with pytest.raises(TokenizerError, match="merges.txt: sha256 differs"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok/vocab.json").unlink()
    with pytest.raises(TokenizerError, match="vocab.json: missing"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


def test_hf_byte_level_bpe_reads_our_files(small, tmp_path, valid_text):
    from tokenizers import ByteLevelBPETokenizer

    small.save(tmp_path / "tok")
    hf = ByteLevelBPETokenizer(str(tmp_path / "tok/vocab.json"), str(tmp_path / "tok/merges.txt"),
                               add_prefix_space=False)
    hf.add_special_tokens([EOT])
    text = valid_text[:100_000] + " Grüße 日本語 😀 12345 it's  two  spaces\n\n"
    assert hf.encode(text).ids == small.encode(text)
    assert hf.get_vocab()[EOT] == small.eot_id


def test_bad_tokenizer_inputs(small):
    vocab = {i: t for i, t in small.vocab.items() if i not in small.special_tokens.values()}
    with pytest.raises(TokenizerError, match="empty string"):
        Tokenizer(vocab, small.merges, [""])
    with pytest.raises(TokenizerError, match="also an ordinary token"):
        Tokenizer(vocab, small.merges, ["a"])
    with pytest.raises(TokenizerError, match="lacks the single bytes"):
        Tokenizer({**{i: bytes([i]) for i in range(256)}, 65: b"zz"}, [], [])
    with pytest.raises(TokenizerError, match="not in the vocab"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [(b"a", b"b")], [])
