"""encode_shards: data/clean/{train,val}.txt + data/tokenizer -> data/shards/{split}_NNNN.bin + reports/shards.json.

Each story becomes its ids followed by <|endoftext|>, encoded by the fast engine on
`shards.workers` processes. Validation goes first: once written, its shards are read back and
compared id for id with the from-scratch `Tokenizer.encode`, so a wrong engine stops the stage
before the long train split.
"""
import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.config import load_params
from tinylm.corpus.formats import EOT_LINE, iter_eot_stories
from tinylm.tokenizer.fast_encode import ParallelEncoder, check_against_reference, encode_split
from tinylm.corpus.shards import load_split, remove_stale_shards
from tinylm.errors import PipelineError, run_stage
from tinylm.records.shards import CheckedShardSplit, ShardSplit, ShardsReport
from tinylm.records.io import write_record

CLEAN, TOKENIZER, SHARDS = Path("data/clean"), Path("data/tokenizer"), Path("data/shards")
REPORT = Path("reports/shards.json")
SEPARATOR_BYTES = len(f"\n{EOT_LINE}\n")


def read_documents(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise PipelineError(f"{path}: missing. Fix: run `dvc repro clean` first.")
    try:
        yield from iter_eot_stories(path)
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not valid UTF-8 ({exc.reason}). Fix: rerun `dvc repro clean`.") from None


def encode(encoder: ParallelEncoder, split: str, shard_tokens: int) -> ShardSplit:
    """Encode data/clean/{split}.txt into the split's shards, with a progress bar in text bytes."""
    path = CLEAN / f"{split}.txt"
    with tqdm(total=path.stat().st_size if path.is_file() else None, unit="B", unit_scale=True,
              desc=f"encode {split}") as bar:
        stats = encode_split(encoder, read_documents(path), SHARDS, split, shard_tokens,
                             on_batch=lambda b: bar.update(b.text_bytes + b.documents * SEPARATOR_BYTES))
    if stats.documents == 0:
        raise PipelineError(f"{path}: no stories. Fix: check the clean params and rerun `dvc repro clean`.")
    record = stats.record()
    print(f"encode_shards: {split}: {record.documents} stories, {record.tokens} tokens in {record.shards} "
          f"shard(s), {record.bytes_per_token} bytes/token, {record.mb_per_s} MB/s")
    return record


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(TOKENIZER)
    removed = remove_stale_shards(SHARDS)
    if removed:
        print(f"encode_shards: removed {len(removed)} stale files from {SHARDS}")
    with ParallelEncoder(tokenizer, params.shards.workers) as encoder:
        engine = "tiktoken core" if encoder.local.uses_tiktoken else "our encoder (merges not exportable to tiktoken)"
        print(f"encode_shards: {engine} on {params.shards.workers} process(es)")
        val = encode(encoder, "val", params.shards.shard_tokens)
        ids = np.concatenate(load_split(SHARDS, "val", tokenizer.fingerprint))
        val_path = CLEAN / "val.txt"
        checked = check_against_reference(tokenizer, read_documents(val_path), ids, where=str(val_path))
        print(f"encode_shards: val: ids equal Tokenizer.encode on all {checked} stories")
        train = encode(encoder, "train", params.shards.shard_tokens)
    write_record(REPORT, ShardsReport(vocab_size=tokenizer.vocab_size, train=train,
                                      val=CheckedShardSplit(**dataclasses.asdict(val), checked_documents=checked)))


if __name__ == "__main__":
    run_stage(main)
