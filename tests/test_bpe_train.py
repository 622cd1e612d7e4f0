"""BPE training: hand-worked merges, a naive reference, streaming/parallel counting, bad input, the stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.tokenizer import train as bpe_train
from tinylm.tokenizer.bpe import EOT, Tokenizer, TokenizerError, load_tokenizer
from tinylm.tokenizer.train import train_bpe
from tinylm.tokenizer.train import count_pretokens, merge_pretokens
from tinylm.tokenizer.pretokenize import PRETOKEN_RE, PreTokenizer, read_utf8


def _write(tmp_path, text: str, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def reference_bpe(word_counts: dict[str, int], vocab_size: int) -> list[tuple[bytes, bytes]]:
    """BPE by the definition: recount every pair each round, take the max (count, left, right)."""
    words = {tuple(bytes([b]) for b in word.encode()): count for word, count in word_counts.items()}
    merges = []
    while 256 + len(merges) < vocab_size:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged_words = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_words[tuple(out)] = count
        words = merged_words
    return merges


def test_hand_worked_example_with_ties(tmp_path):
    # Pre-tokens: "ab" x1, " ab" x2, " cd" x3, "<|endoftext|>" is split out.
    # Round 1: (a,b)=3, ( ,c)=3, (c,d)=3 tie -> greatest first byte: (c,d).
    # Round 2: (a,b)=3, ( ,cd)=3 tie -> "a" > " ": (a,b).  Round 3: ( ,cd)=3.  Round 4: ( ,ab)=2.
    path = _write(tmp_path, f"ab ab ab{EOT} cd cd cd")
    vocab, merges = train_bpe(path, 256 + 4 + 1, [EOT])
    assert merges == [(b"c", b"d"), (b"a", b"b"), (b" ", b"cd"), (b" ", b"ab")]
    assert [vocab[i] for i in range(256, 261)] == [b"cd", b"ab", b" cd", b" ab", EOT.encode()]
    # A larger vocab stops when no pair is left; a smaller one takes a prefix of the merges.
    assert train_bpe(path, 1000, [EOT])[1] == merges
    assert train_bpe(path, 256 + 2 + 1, [EOT])[1] == merges[:2]
    tokenizer = Tokenizer(vocab, merges, [EOT])
    assert tokenizer.encode(f" cd ab{EOT}abcd") == [258, 259, 260, 257, 256]


def test_ties_compare_second_byte_strings(tmp_path):
    # "ab", " ac": all three pairs once. (a,c) > (a,b) > ( ,a); then (a,b) beats ( ,ac).
    path = _write(tmp_path, "ab ac")
    assert train_bpe(path, 300, [])[1] == [(b"a", b"c"), (b"a", b"b"), (b" ", b"ac")]


def test_special_tokens_are_not_learned_from(tmp_path):
    path = _write(tmp_path, f"the cat{EOT}the dog{EOT}" * 50)
    vocab, merges = train_bpe(path, 400, [EOT])
    assert not any(b"endoftext" in left + right or b"<|" in left + right for left, right in merges)
    assert vocab[max(vocab)] == EOT.encode()


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text("ab c'\n1é", min_size=1, max_size=8), st.integers(1, 6), min_size=1, max_size=12),
       st.integers(0, 40))
def test_incremental_merge_loop_equals_the_definition(word_counts, extra):
    vocab, merges = merge_pretokens(word_counts, 256 + extra, [])
    assert merges == reference_bpe(word_counts, 256 + extra)
    assert len(set(vocab.values())) == len(vocab) == 256 + len(merges)


def test_parallel_streaming_count_equals_a_whole_text_count(tmp_path, shared_dir, monkeypatch):
    text = (shared_dir / "data/tinystories/TinyStories-valid-sample.txt").read_text(encoding="utf-8")[:60_000]
    text += "tail without a special token, ending in spaces   "
    path = _write(tmp_path, text)
    expected = Counter()
    for piece in PreTokenizer([EOT]).ordinary_pieces(text):
        expected.update(PRETOKEN_RE.findall(piece))
    monkeypatch.setattr(bpe_train, "BLOCK_CHARS", 997)  # many blocks, many cut points
    assert count_pretokens(path, [EOT], workers=1) == expected
    assert count_pretokens(path, [EOT], workers=2) == expected


def test_bad_inputs_are_clear_errors(tmp_path):
    corpus = _write(tmp_path, "some text")
    with pytest.raises(TokenizerError, match=r"must be >= 257"):
        train_bpe(corpus, 256, [EOT])
    with pytest.raises(ValueError, match="empty string"):
        train_bpe(corpus, 300, [""])
    with pytest.raises(ValueError, match="listed twice"):
        train_bpe(corpus, 300, [EOT, EOT])
    for name, text in (("empty.txt", ""), ("only_specials.txt", EOT * 3)):
        with pytest.raises(TokenizerError, match=f"{name}: no text to train on"):
            train_bpe(_write(tmp_path, text, name), 300, [EOT])
    with pytest.raises(TokenizerError, match="missing.txt: not found"):
        train_bpe(tmp_path / "missing.txt", 300, [EOT])


def test_non_utf8_input_names_the_file_and_byte_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("héllo wörld".encode("utf-8") + b" caf\xe9 ok")
    with pytest.raises(TokenizerError, match=r"latin1.txt: not valid UTF-8 at byte offset 17"):
        train_bpe(bad, 300, [EOT])
    # Also when the bad byte comes right after a character split across two reads.
    for chunk_bytes in (1, 2, 3, 5, 7):
        with pytest.raises(TokenizerError, match="byte offset 17"):
            list(read_utf8(bad, chunk_bytes=chunk_bytes))
    assert "".join(read_utf8(_write(tmp_path, "héllo 😀 wörld"), chunk_bytes=1)) == "héllo 😀 wörld"


# ------------------------------------------------------------------ the stage, end to end


def _stage_dir(tmp_path, repo_root, shared_dir, vocab_size: int):
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["tokenizer"].update(vocab_size=vocab_size, compare_vocab_sizes=[256, vocab_size], workers=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stories = (shared_dir / "data/tinystories/TinyStories-train-sample.txt").read_text(encoding="utf-8")
    stories = stories.split(f"\n{EOT}\n")
    clean = tmp_path / "data/clean"
    clean.mkdir(parents=True)
    (clean / "train.txt").write_text("".join(s + f"\n{EOT}\n" for s in stories[:200]), encoding="utf-8")
    (clean / "val.txt").write_text("".join(s + f"\n{EOT}\n" for s in stories[200:260]), encoding="utf-8")


def _run_stage(repo_root, cwd):
    return subprocess.run([sys.executable, str(repo_root / "stages/train_bpe.py")], cwd=cwd,
                          capture_output=True, text=True, env=os.environ.copy(), timeout=300)


def test_stage_end_to_end(tmp_path, repo_root, shared_dir):
    _stage_dir(tmp_path, repo_root, shared_dir, vocab_size=400)
    result = _run_stage(repo_root, tmp_path)
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer(tmp_path / "data/tokenizer")
    assert tokenizer.vocab_size == 400 and tokenizer.eot_id == 399
    report = json.loads((tmp_path / "reports/tokenizer.json").read_text())
    assert report["vocab_size"] == 400 and report["fingerprint"] == tokenizer.fingerprint
    val = (tmp_path / "data/clean/val.txt").read_text(encoding="utf-8")
    assert report["val_tokens"] == len(tokenizer.encode(val))
    assert report["vocab_sizes"]["256"]["vocab_size"] == 257
    assert report["vocab_sizes"]["256"]["val_tokens"] > report["val_tokens"]
    for name in ("hf_bpe", "hf_unigram", "hf_unigram_metaspace", "gpt2"):
        assert report[name]["val_bytes_per_token"] > 1
    assert 0.5 < report["hf_bpe"]["vocab_overlap"] <= 1
    assert "".join(report["examples"]["strawberry"]["ours"]) == "strawberry"
    assert "".join(report["examples"]["strawberry"]["gpt2"]) == "strawberry"


def test_stage_without_clean_data_fails_clearly(tmp_path, repo_root, shared_dir):
    _stage_dir(tmp_path, repo_root, shared_dir, vocab_size=300)
    (tmp_path / "data/clean/val.txt").unlink()
    result = _run_stage(repo_root, tmp_path)
    assert result.returncode == 2
    assert "data/clean/val.txt: missing; run the clean stage" in result.stderr
