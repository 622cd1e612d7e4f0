"""reports/tokenizer.json: our BPE's numbers, compared with HF `tokenizers`, GPT-2 and other sizes.

All are measured on the same validation text as bytes of UTF-8 per token (higher = fewer tokens
for the same text, so a longer context per block and less compute per story). Special tokens
count as one token each under every tokenizer.

- HF `tokenizers` BPE and Unigram, trained on the same stories (split on the special tokens, as
  ours are) with the same vocab size and GPT-2's byte-level pre-tokenizer, so only the learning
  algorithm differs; plus Unigram with SentencePiece's whitespace-only pre-tokenizer (Metaspace),
  its usual setup. Vocab overlap: the share of our learned (multi-byte) tokens they also have.
- GPT-2 (tiktoken, 50,257 tokens, trained on web text).
- Our BPE at other vocab sizes (256 = bytes only, no merges), from one pre-token count.
- A few words as tokens, the material for why LLMs miscount letters.

The trained comparisons (HF and ours at other sizes) learn from at most `tokenizer.compare_max_bytes`
of the train split, while our tokenizer itself learns from all of it: HF's trainers hold their
input's words in memory and Unigram's take minutes per hundred MB, and a few MB of stories are
plenty to rank algorithms at a vocab of thousands. The sample is stories spread evenly over the
file, not its first bytes: corpora are not shuffled (the shared sample starts with one file's
head, the hub's split comes in generation order), and a slice of one region would stand for all.
A corpus that fits is the sample as it is, byte for byte.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tinylm.records.tokenizer import Compression, ExampleTokens, LearnedCompression, TokenizerReport
from tinylm.tokenizer.bpe import EOT, GPT2_MERGES_FILE, GPT2_VOCAB_FILE, Tokenizer, str_to_token
from tinylm.tokenizer.train import count_pretokens, merge_pretokens
from tinylm.tokenizer.pretokenize import PreTokenizer, read_utf8

EXAMPLE_WORDS = ("strawberry", " strawberry", " antidisestablishmentarianism", " 1234567")
# Where the Makefile points tiktoken (GPT-2's files, offline); see ../shared/README.md.
DEFAULT_TIKTOKEN_CACHE = Path("../shared/tiktoken-cache")


def bytes_per_token(text: str, num_tokens: int) -> float:
    return round(len(text.encode("utf-8")) / max(num_tokens, 1), 4)


def _shown(token: bytes) -> str:
    """A token as readable text; a token ending inside a UTF-8 character shows U+FFFD."""
    return token.decode("utf-8", errors="replace")


def _learned(tokens: set[bytes]) -> set[bytes]:
    return {token for token in tokens if len(token) > 1}


def sample_stories(path: str | os.PathLike, max_bytes: int, out: str | os.PathLike) -> int:
    """Write to `out` about `max_bytes` of the stories of `path`, spread evenly over it; return the
    bytes written.

    A story (the bytes up to and including an <|endoftext|>) is taken when the bytes taken so far
    are behind max_bytes / file size of the bytes read, counting the story's: the whole file when it
    fits, else each stretch of the file in proportion, and at most one story over max_bytes. The
    file is read in 1 MiB blocks, so memory stays at a block plus one story."""
    total = os.path.getsize(path)
    separator = EOT.encode("utf-8")
    taken = read = 0
    with open(path, "rb") as source, open(out, "wb") as sample:
        def consider(story: bytes) -> None:
            nonlocal taken, read
            read += len(story)
            if taken * total < read * max_bytes:
                sample.write(story)
                taken += len(story)

        pending = b""
        while block := source.read(1 << 20):
            *stories, pending = (pending + block).split(separator)
            for story in stories:
                consider(story + separator)
        if pending:
            consider(pending)
    return taken


def _documents(path: str | os.PathLike, pretokenizer: PreTokenizer) -> Iterator[str]:
    """The text between special tokens, streamed (HF's trainers keep only their word counts)."""
    for block in pretokenizer.blocks(read_utf8(path)):
        yield from filter(None, pretokenizer.ordinary_pieces(block))


def train_hf(kind: str, documents: Iterable[str], vocab_size: int, special_tokens: Sequence[str]):
    """An HF tokenizer: kind is "bpe" or "unigram" (byte-level) or "unigram_metaspace"."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    common = dict(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False)
    if kind == "unigram_metaspace":
        tokenizer = HFTokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token="<unk>", **common)
    else:
        tokenizer = HFTokenizer(models.BPE() if kind == "bpe" else models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer_class = trainers.BpeTrainer if kind == "bpe" else trainers.UnigramTrainer
        trainer = trainer_class(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def hf_token_bytes(kind: str, token: str) -> bytes:
    if kind == "unigram_metaspace":
        return token.replace("▁", " ").encode("utf-8")
    return str_to_token(token, f"HF {kind} vocab")


def gpt2_encoding():
    """tiktoken's `gpt2` from the local cache, or None when GPT-2's files are not there."""
    cache = Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DEFAULT_TIKTOKEN_CACHE)))
    if not ((cache / GPT2_VOCAB_FILE).is_file() and (cache / GPT2_MERGES_FILE).is_file()):
        return None
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def _compression(vocab_size: int, val_text: str, val_tokens: int) -> Compression:
    return Compression(vocab_size=vocab_size, val_tokens=val_tokens,
                       val_bytes_per_token=bytes_per_token(val_text, val_tokens))


def _trained_comparisons(tokenizer: Tokenizer, path: str | os.PathLike, val_text: str, compare_sizes: Sequence[int],
                         workers: int, log: Callable[[str], None]
                         ) -> tuple[dict[str, LearnedCompression], dict[str, Compression]]:
    """The HF tokenizers and our BPE at `compare_sizes`, each trained on the stories in `path`."""
    special_tokens = list(tokenizer.special_tokens)
    ours_learned = _learned({t for i, t in tokenizer.vocab.items() if i not in tokenizer.special_tokens.values()})
    pretokenizer = PreTokenizer(special_tokens)
    # Specials never merge with their neighbours, so the pieces between them encode separately.
    val_parts = pretokenizer.split_specials(val_text)
    val_pieces, val_specials = [p for p in val_parts[::2] if p], len(val_parts) // 2

    hf: dict[str, LearnedCompression] = {}
    for kind in ("bpe", "unigram", "unigram_metaspace"):
        log(f"training HF tokenizers {kind} (vocab {tokenizer.vocab_size})")
        trained = train_hf(kind, _documents(path, pretokenizer), tokenizer.vocab_size, special_tokens)
        theirs = _learned({hf_token_bytes(kind, t) for t in trained.get_vocab() if t not in special_tokens})
        val_tokens = val_specials + sum(len(e.ids) for e in trained.encode_batch(val_pieces))
        hf[kind] = LearnedCompression(vocab_size=trained.get_vocab_size(), val_tokens=val_tokens,
                                      val_bytes_per_token=bytes_per_token(val_text, val_tokens),
                                      vocab_overlap=round(len(ours_learned & theirs) / max(len(ours_learned), 1), 4))

    log(f"training our BPE at vocab sizes {list(compare_sizes)}")
    word_counts = count_pretokens(path, special_tokens, workers)
    sizes = {}
    for size in compare_sizes:
        vocab, merges = merge_pretokens(word_counts, max(size, 256 + len(special_tokens)), special_tokens)
        ids = Tokenizer(vocab, merges, special_tokens).encode(val_text)
        sizes[str(size)] = _compression(len(vocab), val_text, len(ids))
    return hf, sizes


def tokenizer_report(tokenizer: Tokenizer, train_seconds: float, train_path: str | os.PathLike, val_text: str,
                     compare_sizes: Sequence[int], compare_max_bytes: int, workers: int = 1,
                     log: Callable[[str], None] = print) -> TokenizerReport:
    """reports/tokenizer.json: our BPE's own numbers, then the comparisons of the module docstring,
    those that train on at most `compare_max_bytes` of the stories in `train_path`."""
    total = os.path.getsize(train_path)
    if total <= compare_max_bytes:
        compare_bytes = total
        hf, sizes = _trained_comparisons(tokenizer, train_path, val_text, compare_sizes, workers, log)
    else:
        with tempfile.TemporaryDirectory(prefix="tinylm-compare-") as tmp:
            sample = Path(tmp) / "sample.txt"
            compare_bytes = sample_stories(train_path, compare_max_bytes, sample)
            log(f"comparisons train on {compare_bytes / 1e6:.1f} MB of stories spread over the {total / 1e6:.1f} MB "
                f"of {train_path} (tokenizer.compare_max_bytes: {compare_max_bytes})")
            hf, sizes = _trained_comparisons(tokenizer, sample, val_text, compare_sizes, workers, log)

    special_tokens = list(tokenizer.special_tokens)
    encoding = gpt2_encoding()
    gpt2, gpt2_tokens = None, {}
    if encoding is not None:
        ids = encoding.encode(val_text, allowed_special=set(special_tokens) & encoding.special_tokens_set)
        gpt2 = _compression(encoding.n_vocab, val_text, len(ids))
        gpt2_tokens = {w: [_shown(encoding.decode_single_token_bytes(i)) for i in encoding.encode(w)]
                       for w in EXAMPLE_WORDS}
    else:
        log("GPT-2's files are not in TIKTOKEN_CACHE_DIR: the GPT-2 comparison is left out")

    ours_tokens = len(tokenizer.encode(val_text))
    return TokenizerReport(
        vocab_size=tokenizer.vocab_size, num_merges=len(tokenizer.merges), train_seconds=round(train_seconds, 3),
        val_tokens=ours_tokens, val_bytes_per_token=bytes_per_token(val_text, ours_tokens),
        fingerprint=tokenizer.fingerprint, compare_max_bytes=compare_max_bytes, compare_bytes=compare_bytes,
        hf_bpe=hf["bpe"], hf_unigram=hf["unigram"], hf_unigram_metaspace=hf["unigram_metaspace"], gpt2=gpt2,
        vocab_sizes=sizes,
        examples={word: ExampleTokens(ours=[_shown(tokenizer.vocab[i]) for i in tokenizer.encode(word)],
                                      gpt2=gpt2_tokens.get(word)) for word in EXAMPLE_WORDS},
    )


__all__ = ["EXAMPLE_WORDS", "bytes_per_token", "gpt2_encoding", "hf_token_bytes", "sample_stories", "tokenizer_report",
           "train_hf"]
