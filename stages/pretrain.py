"""pretrain: data/shards + data/tokenizer -> data/model/{model.pt,model.json} + reports/train/ (dvclive).

Resumes from the scratch checkpoint checkpoints/pretrain/last.pt when it belongs to this run
(see tinylm/training/checkpoint.py for why it lives outside DVC's outputs) and deletes it after success.
dvc.yaml runs it through tinylm/training/launch.py: as itself for one process, under torchrun with
train.nproc_per_node processes on each of train.nnodes nodes (gloo on CPU, NCCL on CUDA) otherwise; the
launch must match those params. One process per node (local rank 0) writes
the outputs into its node's workspace.
"""
from pathlib import Path

from tinylm.tokenizer.bpe import load_tokenizer
from tinylm.training.checkpoint import remove_checkpoint
from tinylm.config import load_params, to_dict
from tinylm.model import GPTConfig, save_trained_model
from tinylm.corpus.shards import load_split
from tinylm.errors import run_stage
from tinylm.records.environment import FILE as ENVIRONMENT, check_environment, current_environment
from tinylm.records.io import write_record
from tinylm.records.model import TrainingSummary
from tinylm.training.runtime import Distributed, check_launch
from tinylm.training.trainer import train

TOKENIZER, SHARDS, MODEL = Path("data/tokenizer"), Path("data/shards"), Path("data/model")
CHECKPOINT = Path("checkpoints/pretrain/last.pt")
REPORTS = Path("reports/train")


def main() -> None:
    params = load_params()
    distributed = Distributed.from_env()
    check_launch(params.train, distributed)
    environment = current_environment()
    if distributed.writes_outputs:  # one warning per node
        check_environment("pretrain", environment)
    tokenizer = load_tokenizer(TOKENIZER)
    train_tokens, val_tokens = (load_split(SHARDS, split, tokenizer.fingerprint) for split in ("train", "val"))
    config = GPTConfig.from_params(params.model, tokenizer.vocab_size)
    result = train(config, params.train, train_tokens, val_tokens, checkpoint_path=CHECKPOINT,
                   log_dir=REPORTS, tokenizer_fingerprint=tokenizer.fingerprint, tokenizer=tokenizer)
    if not result.writes_outputs:
        return
    summary = TrainingSummary(
        config=to_dict(config),
        params=result.model.num_params(),
        params_without_embeddings=result.model.num_params(include_embeddings=False),
        steps=result.steps,
        tokens_trained=result.tokens,
        final_train_loss=result.train_loss,
        final_val_loss=result.val_loss,
        tokenizer_fingerprint=tokenizer.fingerprint,
    )
    save_trained_model(result.model, MODEL, summary)  # model.json records model.pt's sha256
    write_record(MODEL / ENVIRONMENT, environment)
    remove_checkpoint(CHECKPOINT)
    print(f"pretrain: {result.steps} steps, {result.tokens:,} tokens, val loss {result.val_loss:.4f} -> {MODEL}")


if __name__ == "__main__":
    run_stage(main)
