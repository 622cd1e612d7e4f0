"""A from-scratch byte-level BPE tokenizer (pure Python + `regex`), in GPT-2's file format.

Ids are whatever the vocabulary says: ours are the 256 bytes, then one id per new token in merge
order, then the special tokens; GPT-2's `encoder.json` orders bytes differently, which is why
ids always come from the vocabulary and merge priority from the order of `merges.txt`.

Encoding applies, inside each pre-token, the adjacent pair of lowest merge rank until none is
left; pre-tokens repeat a lot in natural text, so each distinct one is encoded once and cached.

Files: `vocab.json` (token string -> id) and `merges.txt` (`#version: 0.2`, then one "left
right" pair per line), both writing bytes through GPT-2's byte-to-unicode map, so GPT-2's own
files load with `Tokenizer.from_files` and ours load in HF `tokenizers`. `tokenizer.json` adds
the pattern, the special tokens and the sha256 of both files, which `load_tokenizer` checks.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from tinylm.files import replace_directory, sha256_file, write_json, write_text
from tinylm.tokenizer.pretokenize import GPT2_PATTERN, PRETOKEN_RE, PreTokenizer, TokenizerError

EOT = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"
# Distinct pre-tokens kept encoded; past this the cache restarts, so memory stays bounded.
CACHE_LIMIT = 1 << 18
# tiktoken's cache names for GPT-2's files (see ../shared/README.md).
GPT2_VOCAB_FILE = "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"  # encoder.json
GPT2_MERGES_FILE = "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"  # vocab.bpe


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (so files hold no raw spaces)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {char: b for b, char in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str, where: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in text)
    except KeyError as exc:
        raise TokenizerError(f"{where}: {text!r} has {exc.args[0]!r}, outside GPT-2's byte alphabet") from None


def merge_pair(word: Sequence[int], left: int, right: int, merged: int) -> list[int]:
    """`word` with every non-overlapping (left, right), scanned left to right, replaced by `merged`."""
    out = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class _PretokenCache(dict):
    """Pre-token string -> ids; a miss runs BPE on it. Cleared when full, to bound memory."""

    def __init__(self, encode_word) -> None:
        super().__init__()
        self._encode_word = encode_word

    def __missing__(self, word: str) -> tuple[int, ...]:
        if len(self) >= CACHE_LIMIT:
            self.clear()
        ids = self[word] = self._encode_word(word.encode("utf-8"))
        return ids


class Tokenizer:
    """Byte-level BPE: `vocab` id -> bytes, `merges` in priority order, special tokens by name.

    A special token takes the id of its bytes in `vocab` if there is one, else the next free id.
    """

    def __init__(self, vocab: Mapping[int, bytes], merges: Sequence[tuple[bytes, bytes]],
                 special_tokens: Sequence[str] = ()) -> None:
        self.pattern = GPT2_PATTERN
        self._pretokenizer = PreTokenizer(special_tokens)
        self.vocab: dict[int, bytes] = {int(i): bytes(token) for i, token in vocab.items()}
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.special_tokens: dict[str, int] = self._place_special_tokens(self._pretokenizer.special_tokens)
        self.vocab_size = max(self.vocab) + 1
        missing = sorted(set(range(self.vocab_size)) - set(self.vocab))
        if missing:
            raise TokenizerError(f"vocab has no token for ids {missing[:10]} (ids must be 0..{self.vocab_size - 1})")
        self._id_bytes = [self.vocab[i] for i in range(self.vocab_size)]
        ordinary = self._ordinary_ids()
        absent = [b for b in range(256) if bytes([b]) not in ordinary]
        if absent:
            raise TokenizerError(f"vocab lacks the single bytes {absent[:10]}: a byte-level vocab has all 256")
        self._byte_ids = [ordinary[bytes([b])] for b in range(256)]
        # (left id, right id) -> (rank, merged id); rank = position in merges.txt.
        self._merge_table: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(self.merges):
            try:
                pair = (ordinary[left], ordinary[right])
                merged = ordinary[left + right]
            except KeyError as exc:
                raise TokenizerError(f"merge #{rank} {left!r} + {right!r}: {exc.args[0]!r} is not in the vocab") from None
            self._merge_table.setdefault(pair, (rank, merged))
        self._cache = _PretokenCache(self._encode_word)

    def _place_special_tokens(self, tokens: list[str]) -> dict[str, int]:
        """Ids of the special tokens (GPT-2's <|endoftext|> is 50256 in its vocab; ours come last)."""
        ordinary = {bytes([b]) for b in range(256)} | {left + right for left, right in self.merges}
        ids_of = {token: i for i, token in self.vocab.items()}
        placed = {}
        for token in tokens:
            token_bytes = token.encode("utf-8")
            if token_bytes in ordinary:
                raise TokenizerError(f"special token {token!r} is also an ordinary token (a byte or a merge)")
            if token_bytes not in ids_of:
                ids_of[token_bytes] = max(self.vocab, default=-1) + 1
                self.vocab[ids_of[token_bytes]] = token_bytes
            placed[token] = ids_of[token_bytes]
        return placed

    def _ordinary_ids(self) -> dict[bytes, int]:
        special_ids = set(self.special_tokens.values())
        ids: dict[bytes, int] = {}
        for i in range(self.vocab_size):
            token = self.vocab[i]
            if i in special_ids:
                continue
            if token in ids:
                raise TokenizerError(f"vocab ids {ids[token]} and {i} are the same token {token!r}")
            ids[token] = i
        return ids

    @property
    def eot_id(self) -> int:
        if EOT not in self.special_tokens:
            raise TokenizerError(f"this tokenizer has no {EOT} special token")
        return self.special_tokens[EOT]

    # ------------------------------------------------------------------ encoding and decoding

    def _encode_word(self, word: bytes) -> tuple[int, ...]:
        ids = [self._byte_ids[b] for b in word]
        table = self._merge_table
        unmergeable = (len(self.merges), -1)
        while len(ids) > 1:
            best = min(zip(ids, ids[1:]), key=lambda pair: table.get(pair, unmergeable))
            if best not in table:
                break
            left, right = best
            ids = merge_pair(ids, left, right, table[best][1])
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        lookup = self._cache.__getitem__
        for index, part in enumerate(self._pretokenizer.split_specials(text)):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(chain.from_iterable(map(lookup, PRETOKEN_RE.findall(part))))
        return ids

    def encode_iterable(self, chunks: Iterable[str], block_chars: int = 1 << 20) -> Iterator[int]:
        """The ids of "".join(chunks), as `encode` gives them, yielded block by block: for text larger than
        memory, e.g. `encode_iterable(open(path, encoding="utf-8"))` (a text file yields its lines).

        The chunks may be cut anywhere (mid-word, mid-special-token): they are regrouped into blocks of about
        `block_chars` cut only where pre-tokenization cannot depend on what follows (PreTokenizer.blocks, the
        same cutting BPE training streams with). Memory: a block, plus the longest chunk and the pre-token cache.
        """
        for block in self._pretokenizer.blocks(chunks, block_chars):
            yield from self.encode(block)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(int(i) for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        table = self._id_bytes
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, never an exception."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ files

    def vocab_json(self) -> str:
        special = {i: token for token, i in self.special_tokens.items()}
        strings = [special.get(i) or token_to_str(self._id_bytes[i]) for i in range(self.vocab_size)]
        if len(set(strings)) != len(strings):
            raise TokenizerError("a special token is spelled like an ordinary token in vocab.json; rename it")
        return json.dumps({s: i for i, s in enumerate(strings)}, ensure_ascii=False) + "\n"

    def merges_txt(self) -> str:
        lines = [MERGES_HEADER] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in self.merges]
        return "\n".join(lines) + "\n"

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 naming this tokenizer: pattern, vocab, merges and special token ids."""
        identity = {
            "pattern": self.pattern,
            "vocab_sha256": hashlib.sha256(self.vocab_json().encode("utf-8")).hexdigest(),
            "merges_sha256": hashlib.sha256(self.merges_txt().encode("utf-8")).hexdigest(),
            "special_tokens": self.special_tokens,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt and tokenizer.json, replacing `directory` as a whole.

        The files are written in a staging directory beside it, then swapped in by renames: a
        crash leaves the old directory, the new one, or none, never a mix of the two (tinylm/files.py, replace_directory).
        """

        def fill(staging: Path) -> None:
            write_text(staging / "vocab.json", self.vocab_json())
            write_text(staging / "merges.txt", self.merges_txt())
            write_json(staging / "tokenizer.json", {
                "pattern": self.pattern,
                "special_tokens": self.special_tokens,
                "vocab_size": self.vocab_size,
                "num_merges": len(self.merges),
                "vocab_sha256": sha256_file(staging / "vocab.json"),
                "merges_sha256": sha256_file(staging / "merges.txt"),
                "fingerprint": self.fingerprint,
            })

        replace_directory(directory, fill)

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                   special_tokens: Sequence[str] = ()) -> Tokenizer:
        """Load GPT-2-format files (ours, or GPT-2's own encoder.json + vocab.bpe)."""
        try:
            encoder = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
            merge_lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read the tokenizer files: {exc}") from None
        if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
            raise TokenizerError(f"{vocab_path}: expected a JSON object mapping token strings to ids")
        specials = set(special_tokens)
        vocab: dict[int, bytes] = {}
        for text, i in encoder.items():
            if i in vocab:
                raise TokenizerError(f"{vocab_path}: id {i} is given to two tokens")
            vocab[i] = text.encode("utf-8") if text in specials else str_to_token(text, str(vocab_path))
        merges = []
        for number, line in enumerate(merge_lines, start=1):
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{merges_path}:{number}: expected two tokens separated by one space")
            merges.append((str_to_token(parts[0], f"{merges_path}:{number}"),
                           str_to_token(parts[1], f"{merges_path}:{number}")))
        return cls(vocab, merges, special_tokens)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load data/tokenizer/ (written by `Tokenizer.save`), verifying both files' sha256."""
    directory = Path(directory)
    fix = "rerun the train_bpe stage (dvc repro train_bpe)"
    try:
        meta = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{directory / 'tokenizer.json'}: cannot read it ({exc}); {fix}") from None
    for name, key in (("vocab.json", "vocab_sha256"), ("merges.txt", "merges_sha256")):
        path = directory / name
        if not path.is_file():
            raise TokenizerError(f"{path}: missing; {fix}")
        if sha256_file(path) != meta.get(key):
            raise TokenizerError(f"{path}: sha256 differs from {directory / 'tokenizer.json'}; {fix}")
    if not isinstance(meta.get("special_tokens"), dict):
        raise TokenizerError(f"{directory / 'tokenizer.json'}: has no special_tokens mapping; {fix}")
    special_tokens = sorted(meta["special_tokens"], key=meta["special_tokens"].get)
    tokenizer = Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt", special_tokens)
    if tokenizer.special_tokens != meta["special_tokens"] or tokenizer.fingerprint != meta.get("fingerprint"):
        raise TokenizerError(f"{directory}: the files do not match tokenizer.json; {fix}")
    return tokenizer


def load_gpt2(cache_dir: str | os.PathLike) -> Tokenizer:
    """GPT-2's tokenizer from tiktoken's cache folder (ids equal tiktoken's `gpt2`)."""
    cache_dir = Path(cache_dir)
    return Tokenizer.from_files(cache_dir / GPT2_VOCAB_FILE, cache_dir / GPT2_MERGES_FILE, [EOT])

