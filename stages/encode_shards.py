"""encode_shards: data/clean/{train,val}.txt + data/tokenizer -> data/shards/{split}_NNNN.bin + reports/shards.json.

Each story becomes its ids followed by <|endoftext|>, encoded by the fast engine on
`shards.workers` processes. Validation goes first: once written, its shards are read back and
compared id for id with the from-scratch `Tokenizer.encode`, so a wrong engine stops the stage
before the long train split.
"""
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.config import load_params
from tinylm.corpus.formats import EOT_LINE, iter_eot_stories
from tinylm.tokenizer.fast_encode import ParallelEncoder, check_against_reference, encode_split
from tinylm.files import write_json
from tinylm.corpus.shards import load_split, remove_stale_shards
from tinylm.errors import PipelineError, run_stage

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


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(TOKENIZER)
    removed = remove_stale_shards(SHARDS)
    if removed:
        print(f"encode_shards: removed {len(removed)} stale files from {SHARDS}")
    report = {"vocab_size": tokenizer.vocab_size}
    with ParallelEncoder(tokenizer, params.shards.workers) as encoder:
        engine = "tiktoken core" if encoder.local.uses_tiktoken else "our encoder (merges not exportable to tiktoken)"
        print(f"encode_shards: {engine} on {params.shards.workers} process(es)")
        for split in ("val", "train"):
            path = CLEAN / f"{split}.txt"
            with tqdm(total=path.stat().st_size if path.is_file() else None, unit="B", unit_scale=True,
                      desc=f"encode {split}") as bar:
                stats = encode_split(encoder, read_documents(path), SHARDS, split, params.shards.shard_tokens,
                                     on_batch=lambda b: bar.update(b.text_bytes + b.documents * SEPARATOR_BYTES))
            if stats.documents == 0:
                raise PipelineError(f"{path}: no stories. Fix: check the clean params and rerun `dvc repro clean`.")
            report[split] = stats.as_dict()
            print(f"encode_shards: {split}: {stats.documents} stories, {stats.tokens} tokens in {stats.shards} "
                  f"shard(s), {report[split]['bytes_per_token']} bytes/token, {report[split]['mb_per_s']} MB/s")
            if split == "val":
                ids = np.concatenate(load_split(SHARDS, split, tokenizer.fingerprint))
                report[split]["checked_documents"] = check_against_reference(
                    tokenizer, read_documents(path), ids, where=str(path))
                print(f"encode_shards: val: ids equal Tokenizer.encode on all {stats.documents} stories")
    write_json(REPORT, report)


if __name__ == "__main__":
    run_stage(main)
