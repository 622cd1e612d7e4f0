"""Binary token shards: `data/shards/{split}_{index:04d}.bin`, each a fixed 1,024-byte header then uint16 ids.

Header (little-endian), then zeros up to 1,024 bytes:

    magic        8 bytes   b"TINYLMTK"
    version      uint32    FORMAT_VERSION
    token dtype  8 bytes   numpy dtype string, b"<u2" padded with zeros
    token count  uint64    number of ids after the header
    vocab size   uint32    every id is < vocab size (at most 65,535, so ids fit uint16)
    fingerprint  32 bytes  sha256 identifying the tokenizer (vocab + merges + special tokens)
    checksum     8 bytes   xxh3_64 of the ids' bytes (version 2; version 1 had none)

Readers memory-map the ids and trust them only after the header checks out: the magic, the
version, the dtype, a file size equal to header + count * 2 bytes, and the tokenizer fingerprint;
then every id must be below the vocab size and the ids must hash to the checksum, so a flipped
byte in the payload stops the reader instead of training or scoring on it. Ids encoded by another
tokenizer are valid-looking garbage to a model, so a fingerprint mismatch is an error, not a
warning. A split is the concatenation of its shards in index order; documents may straddle a
shard boundary.

The checksum is xxh3_64 because a split is checked each time a stage loads it: on 90 MB of ids it
takes 10-15 ms, against 120-220 ms for zlib.crc32 and 180-460 ms for sha256 and blake2b
(docs/integrity.md). It guards against damage, not tampering: nothing here is a secret.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import xxhash

from tinylm.files import atomic_open
from tinylm.errors import PipelineError

MAGIC = b"TINYLMTK"
FORMAT_VERSION = 2  # 2: the payload checksum
HEADER_BYTES = 1024
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB_SIZE = 65535
_HEADER = struct.Struct("<8sI8sQI32s8s")
_VERSION = struct.Struct("<8sI")  # what every version begins with
_FIX = "Fix: rerun `dvc repro encode_shards`"


class ShardError(PipelineError):
    """A shard is missing, corrupt, or was encoded with a different tokenizer."""


@dataclass(frozen=True)
class ShardHeader:
    version: int
    token_count: int
    vocab_size: int
    tokenizer_fingerprint: str  # hex sha256
    checksum: str  # hex xxh3_64 of the ids' bytes


def shard_path(directory: str | Path, split: str, index: int) -> Path:
    return Path(directory) / f"{split}_{index:04d}.bin"


def _fingerprint_bytes(fingerprint: str) -> bytes:
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise ValueError(f"tokenizer fingerprint must be 64 lowercase hex digits (a sha256), got {fingerprint!r}")
    return bytes.fromhex(fingerprint)


def _check_vocab_size(vocab_size: int) -> None:
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ShardError(f"vocab size {vocab_size}: shards store uint16 ids, so the vocab must be in [1, "
                         f"{MAX_VOCAB_SIZE}]. Fix: set tokenizer.vocab_size <= {MAX_VOCAB_SIZE} in params.yaml "
                         "and rerun `dvc repro encode_shards`.")


def _as_tokens(ids: np.ndarray | Iterable[int], vocab_size: int) -> np.ndarray:
    """Ids as little-endian uint16, after checking they are in [0, vocab_size) (a cast would wrap silently)."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{ids.min()}, {ids.max()}]")
    return ids.astype(TOKEN_DTYPE, copy=False)


def payload_checksum(tokens: np.ndarray) -> bytes:
    """xxh3_64 of the ids' little-endian bytes, as the header stores it."""
    return xxhash.xxh3_64_digest(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE))


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int, tokenizer_fingerprint: str) -> None:
    """Write one shard atomically: a crash leaves the old file or the new one, never a torn one."""
    _check_vocab_size(vocab_size)
    tokens = _as_tokens(tokens, vocab_size)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, TOKEN_DTYPE.str.encode("ascii"), tokens.size, vocab_size,
                          _fingerprint_bytes(tokenizer_fingerprint), payload_checksum(tokens))
    with atomic_open(path, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        tokens.tofile(f)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check a shard's header against the file it heads (not against a tokenizer)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = f.seek(0, 2)
    except FileNotFoundError:
        raise ShardError(f"{path}: missing. {_FIX}.") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot be read ({exc.strerror}). {_FIX}.") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated "
                         f"or not a shard. {_FIX}.")
    magic, version = _VERSION.unpack_from(raw)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r}). {_FIX}.")
    if version != FORMAT_VERSION:
        before = " (older code: shards without a payload checksum)" if version < FORMAT_VERSION else ""
        raise ShardError(f"{path}: shard format version {version}{before}, this code reads version "
                         f"{FORMAT_VERSION}. {_FIX} to rewrite the shards with this code.")
    _, _, dtype, count, vocab_size, fingerprint, checksum = _HEADER.unpack_from(raw)
    if dtype.rstrip(b"\0") != TOKEN_DTYPE.str.encode("ascii") or raw[_HEADER.size:].strip(b"\0"):
        raise ShardError(f"{path}: corrupt header (token dtype {dtype!r} or padding not as written). {_FIX}.")
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ShardError(f"{path}: corrupt header (vocab size {vocab_size}). {_FIX}.")
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(f"{path}: {size} bytes but the header promises {count} tokens ({expected} bytes): "
                         f"the file is {'truncated' if size < expected else 'followed by extra bytes'}. {_FIX}.")
    return ShardHeader(version, count, vocab_size, fingerprint.hex(), checksum.hex())


def read_shard(path: str | Path, tokenizer_fingerprint: str | None = None) -> np.memmap:
    """The shard's ids, memory-mapped read-only, once its header is valid (and matches the tokenizer, if
    given) and its ids are in the vocabulary and hash to the header's checksum."""
    header = read_header(path)
    if tokenizer_fingerprint is not None and header.tokenizer_fingerprint != tokenizer_fingerprint:
        raise ShardError(
            f"{path}: encoded with tokenizer {header.tokenizer_fingerprint[:16]}…, but the tokenizer in use is "
            f"{tokenizer_fingerprint[:16]}…: the ids would mean other tokens. {_FIX} after retraining the tokenizer.")
    ids = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(header.token_count,))
    # The range first: an id past the vocabulary is the one damage that would crash (or silently
    # misindex) an embedding lookup, so it gets its own name; any other change fails the checksum.
    if ids.size and int(ids.max()) >= header.vocab_size:
        position = int(np.argmax(ids >= header.vocab_size))
        raise ShardError(f"{path}: token id {int(ids[position])} at position {position} is outside the tokenizer's "
                         f"vocabulary ({header.vocab_size} ids): the shard is damaged. {_FIX}.")
    if payload_checksum(ids).hex() != header.checksum:
        raise ShardError(f"{path}: its ids do not match the header's checksum (xxh3_64 {header.checksum}): the "
                         f"shard is damaged. {_FIX}.")
    return ids


def _indexed_shards(directory: Path, split: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{re.escape(split)}_(\d{{4,}})\.bin")
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def load_split(shard_dir: str | Path, split: str, tokenizer_fingerprint: str | None = None) -> list[np.memmap]:
    """All shards of a split in index order; the indices must run 0..n-1 and share one tokenizer."""
    shard_dir = Path(shard_dir)
    shards = _indexed_shards(shard_dir, split) if shard_dir.is_dir() else []
    if not shards:
        raise ShardError(f"{shard_dir}: no {split}_NNNN.bin shards. Fix: run `dvc repro encode_shards`.")
    for expected, (index, path) in enumerate(shards):
        if index != expected:
            raise ShardError(f"{shard_path(shard_dir, split, expected)}: missing (found {path.name}); the {split} "
                             f"split would lose tokens. {_FIX}.")
    # Without an expected tokenizer, the first shard's stands in: a split must not mix tokenizers.
    fingerprint = tokenizer_fingerprint or read_header(shards[0][1]).tokenizer_fingerprint
    return [read_shard(path, fingerprint) for _, path in shards]


def write_split(directory: str | Path, split: str, chunks: Iterable[np.ndarray], shard_tokens: int,
                vocab_size: int, tokenizer_fingerprint: str) -> list[int]:
    """Stream chunks of ids into `{split}_0000.bin`, `{split}_0001.bin`, ... of `shard_tokens` ids each (the
    last may be shorter); return the token count of each shard written. Memory stays at one shard."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    _check_vocab_size(vocab_size)
    buffer = np.empty(shard_tokens, dtype=TOKEN_DTYPE)
    filled = 0
    counts: list[int] = []

    def flush() -> None:
        nonlocal filled
        write_shard(shard_path(directory, split, len(counts)), buffer[:filled], vocab_size, tokenizer_fingerprint)
        counts.append(filled)
        filled = 0

    for chunk in chunks:
        chunk = _as_tokens(chunk, vocab_size)
        start = 0
        while start < chunk.size:
            take = min(shard_tokens - filled, chunk.size - start)
            buffer[filled:filled + take] = chunk[start:start + take]
            filled += take
            start += take
            if filled == shard_tokens:
                flush()
    if filled:
        flush()
    return counts


def remove_stale_shards(directory: str | Path) -> list[Path]:
    """Delete the shards (and temp files left by a killed writer) of an earlier run, so that a rerun with
    fewer shards cannot leave old ones behind to be read as part of the split."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = re.compile(r"[a-z]+_\d{4,}\.bin|\.[a-z]+_\d{4,}\.bin\..*\.tmp")
    removed = [p for p in directory.iterdir() if stale.fullmatch(p.name)]
    for path in removed:
        path.unlink()
    return removed
