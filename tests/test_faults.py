"""Fault injection: a damaged artifact or a bad input, met through the real entry points in subprocesses
(`tinylm`, the stage scripts, pretrain's launcher), fails where it is read: exit code 2, one error line
that names the file and the fix, no traceback, and no output written or changed.

The faults start from issue 18's table, what a new user ran into: model.pt with 4 KB zeroed or cut to
100 bytes, a val shard with ids past the vocabulary, stdin that is not UTF-8, a diverging pretrain whose
line drowned under torchrun's traceback; then the same for the other artifacts: a shard's payload, an
old-format shard, the resume checkpoint, the export directory, the records (model.json, reports/*.json).
They run on a workspace of the tiny profile (a BPE of 320 ids, a 1-layer model, 80 stories), made once
by the real train_bpe code, encode_shards stage and pretrain's save_trained_model, and copied per test.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT, save_untrained_model
from tinylm.config import load_params
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.corpus.shards import HEADER_BYTES
from tinylm.model import GPT, GPTConfig
from tinylm.records.download import DownloadedSplit, Provenance
from tinylm.records.io import write_record
from tinylm.records.splits import Splits
from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe

BIN = Path(sys.executable).parent
PROMPT = "Once upon a time"
LAUNCH = ["-m", "tinylm.training.launch", "--nnodes", "1", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
          "--rdzv_endpoint", "127.0.0.1:0"]
RESTORE = "dvc checkout data/model"
RETRAIN = "dvc repro pretrain"
REENCODE = "dvc repro encode_shards"
TEXT_FIX = "Fix: give UTF-8 text"


def entry(name: str) -> list[str]:
    """The command line of an entry point: `tinylm ...`, a stage script, or pretrain's launch (as dvc.yaml runs it)."""
    if name == "launch":
        return [sys.executable, *LAUNCH, str(REPO_ROOT / "stages/pretrain.py")]
    if name.startswith("tinylm "):
        return [str(BIN / "tinylm"), *name.split()[1:]]
    return [sys.executable, str(REPO_ROOT / "stages" / f"{name}.py")]


def run(command: list[str | bytes], cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "TQDM_DISABLE": "1"}
    done = subprocess.run(command, cwd=cwd, input=stdin, capture_output=True, timeout=300, env=env)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8", "replace"),
                                       done.stderr.decode("utf-8", "replace"))


def error_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """The run's one error line, after checking: exit code 2, no traceback, and no other error line; the
    error is the last line the command printed, and it holds each of `words`."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output
    assert result.stderr.strip().splitlines()[-1] == errors[0], output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def files(root: Path) -> dict[str, str]:
    """Every file under root and the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def damage(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def zero_4k_in_the_middle(path: Path) -> None:
    damage(path, path.stat().st_size // 2, bytes(4096))


def cut_to_100_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, shared_dir) -> Path:
    """The tiny profile's data/{clean,tokenizer,shards,model} and params.yaml, in a folder `tinylm` takes for the
    repository root (it holds a .dvc/)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("faults") / "workspace"
    (root / ".dvc").mkdir(parents=True)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        tiny = OmegaConf.to_container(compose(config_name="config", overrides=["profile=tiny"]))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    stories = list(itertools.islice(iter_eot_stories(shared_dir / "data/tinystories/TinyStories-valid-sample.txt"),
                                    80))
    write_eot_stories(root / "data/clean/train.txt", stories[:60])
    write_eot_stories(root / "data/clean/val.txt", stories[60:])
    params = load_params(root / "params.yaml")
    Tokenizer(*train_bpe(root / "data/clean/train.txt", params.tokenizer.vocab_size, [EOT]), [EOT]).save(
        root / "data/tokenizer")
    encoded = run(entry("encode_shards"), root)
    assert encoded.returncode == 0, encoded.stdout + encoded.stderr
    tokenizer = load_tokenizer(root / "data/tokenizer")
    torch.manual_seed(0)
    save_untrained_model(GPT(GPTConfig.from_params(params.model, tokenizer.vocab_size)), tokenizer, root / "data/model")
    return root


@pytest.fixture
def workspace(pristine, tmp_path) -> Path:
    copy = tmp_path / "workspace"
    shutil.copytree(pristine, copy)
    return copy


def data_files(root: Path) -> dict[str, str]:
    return {name: digest for name, digest in files(root).items() if name.startswith("data/")}


def with_params(root: Path, **train) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# --------------------------------------------------------------------------------------------- model.pt


MODEL_READERS = {  # entry point -> what it would have written
    "tinylm generate": [PROMPT],
    "tinylm score": [PROMPT],
    "evaluate_ppl": [],
    "sample_sweep": [],
    "export": [],
}


@pytest.mark.parametrize("reader", MODEL_READERS)
def test_weights_with_4k_zeroed_are_refused_by_every_reader(workspace, reader):
    # The table's first row: generate and score ran on the damaged weights, evaluate_ppl scored them.
    zero_4k_in_the_middle(workspace / "data/model/model.pt")
    (workspace / "data/export/hf").mkdir(parents=True)
    (workspace / "data/export/hf/config.json").write_text("{}\n")  # an earlier export stays as it was
    before = files(workspace)
    result = run([*entry(reader), *MODEL_READERS[reader]], workspace)
    error_line(result, "data/model/model.pt: its sha256 is", "data/model/model.json records", RESTORE, RETRAIN)
    assert files(workspace) == before
    if reader.startswith("tinylm"):
        assert result.stdout == ""  # not even the prompt


def test_weights_cut_to_100_bytes_are_one_line_not_torchs_traceback(workspace):
    # The table's second row: `PytorchStreamReader failed reading zip archive` with a traceback.
    cut_to_100_bytes(workspace / "data/model/model.pt")
    before = files(workspace)
    result = run([*entry("tinylm generate"), PROMPT], workspace)
    error_line(result, "data/model/model.pt: its sha256 is", RESTORE)
    assert result.stdout == "" and files(workspace) == before


def test_weights_that_match_their_hash_but_do_not_load_are_one_line_too(workspace):
    # Bytes that are not a torch file, with a model.json recording exactly them: another writer's pair.
    weights, record = workspace / "data/model/model.pt", workspace / "data/model/model.json"
    cut_to_100_bytes(weights)
    summary = json.loads(record.read_text())
    summary["model_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    record.write_text(json.dumps(summary))
    before = files(workspace)
    error_line(run([*entry("tinylm generate"), PROMPT], workspace), "data/model/model.pt: cannot be loaded (",
               RESTORE)
    assert files(workspace) == before


def test_a_model_folder_outside_any_repository_is_verified_too(workspace, tmp_path):
    # `--model DIR` reads no DVC metadata at all: the hash in model.json is the only check.
    plain = tmp_path / "elsewhere"
    shutil.copytree(workspace / "data/model", plain / "model")
    shutil.copytree(workspace / "data/tokenizer", plain / "tokenizer")
    zero_4k_in_the_middle(plain / "model/model.pt")
    before = files(plain)
    result = run([*entry("tinylm generate"), "--model", str(plain / "model"), PROMPT], plain)
    error_line(result, f"{plain}/model/model.pt: its sha256 is", RESTORE)
    assert result.stdout == "" and files(plain) == before


def test_a_model_json_from_before_the_hash_names_the_key_and_the_stage(workspace):
    record = workspace / "data/model/model.json"
    summary = json.loads(record.read_text())
    del summary["model_sha256"]
    record.write_text(json.dumps(summary))
    before = files(workspace)
    error_line(run(entry("evaluate_ppl"), workspace), "data/model/model.json: has no key 'model_sha256' (written by "
                                                      "an older or different version", RETRAIN)
    assert files(workspace) == before


def test_a_damaged_record_in_reports_names_the_stage_that_writes_it(workspace):
    # The report stage reads the records first: a truncated reports/clean.json stops it before any figure.
    write_record(workspace / "data/raw/provenance.json", Provenance(
        source="../shared/data/tinystories", kind="folder", revision=None, source_sha256={},
        splits=Splits(train=DownloadedSplit(stories=60, bytes=1, sha256="0"),
                      val=DownloadedSplit(stories=20, bytes=1, sha256="0"))))
    (workspace / "reports/clean.json").write_text('{"train": {"stories_in": 60, ')
    before = files(workspace)
    error_line(run(entry("report"), workspace), "reports/clean.json: not valid JSON", "dvc repro clean")
    assert files(workspace) == before  # no report.md, no figure


# --------------------------------------------------------------------------------------------- shards


def test_a_val_shard_with_ids_past_the_vocabulary_is_a_named_error(workspace):
    # The table's third row: `IndexError: index 65535 is out of bounds for axis 0 with size 4096`.
    damage(workspace / "data/shards/val_0000.bin", HEADER_BYTES + 2 * 100, b"\xff" * 10)
    before = files(workspace)
    error_line(run(entry("evaluate_ppl"), workspace), "data/shards/val_0000.bin: token id 65535 at position 100 is "
                                                      "outside the tokenizer's vocabulary (320 ids)", REENCODE)
    assert files(workspace) == before


def test_a_shard_of_the_format_before_checksums_names_the_rewrite(workspace):
    damage(workspace / "data/shards/val_0000.bin", 8, (1).to_bytes(4, "little"))  # the version field
    before = files(workspace)
    error_line(run(entry("evaluate_ppl"), workspace), "data/shards/val_0000.bin: shard format version 1 (older code: "
                                                      "shards without a payload checksum)", REENCODE)
    assert files(workspace) == before


def test_a_train_shard_with_one_id_changed_fails_its_checksum(workspace):
    shard = workspace / "data/shards/train_0000.bin"
    damage(shard, HEADER_BYTES + 2 * 7, (int.from_bytes(shard.read_bytes()[HEADER_BYTES + 14:][:2], "little") ^ 1)
           .to_bytes(2, "little"))  # another id inside the vocabulary: only the checksum can tell
    before = files(workspace)
    error_line(run(entry("launch"), workspace), "data/shards/train_0000.bin: its ids do not match the header's "
                                                "checksum", REENCODE)
    assert files(workspace) == before


# --------------------------------------------------------------------------------------------- text input


@pytest.mark.parametrize("command, stdin, words", [
    # The table's fourth row: `printf 'Once \377 upon' | tinylm generate` was a UnicodeEncodeError traceback.
    (["tinylm generate"], b"Once \xff upon", "stdin is not UTF-8 text (byte 0xff at offset 5"),
    (["tinylm generate", b"Once \xff upon"], None, "the PROMPT argument is not UTF-8 text (byte 0xff at offset 5"),
    (["tinylm score"], b"Once upon\0 a time", "stdin holds a NUL byte (at offset 9)"),
    (["tinylm score", b"Tom \xe9t\xe9"], None, "the TEXT argument is not UTF-8 text (byte 0xe9 at offset 4"),
    (["tinylm tokenize", "fine", b"caf\xe9"], None, "TEXT argument 2 is not UTF-8 text (byte 0xe9 at offset 3"),
])
def test_text_that_is_not_utf8_or_holds_a_nul_is_one_line(workspace, command, stdin, words):
    before = files(workspace)
    result = run([*entry(command[0]), *command[1:]], workspace, stdin=stdin)
    error_line(result, words, TEXT_FIX)
    assert result.stdout == "" and files(workspace) == before


def test_a_file_to_score_that_is_a_directory_or_latin1_is_one_line(workspace):
    (workspace / "latin1.txt").write_bytes("Once upon a time, Zoë".encode("latin-1"))
    before = files(workspace)
    error_line(run([*entry("tinylm score"), "data"], workspace), "data is a directory, not a text file")
    error_line(run([*entry("tinylm score"), "latin1.txt"], workspace),
               "latin1.txt is not UTF-8 text (byte 0xeb at offset 20", TEXT_FIX)
    assert files(workspace) == before


# --------------------------------------------------------------------------------------------- pretrain


def test_a_diverging_pretrain_ends_with_its_one_line_not_a_traceback(workspace):
    # The table's last row: our line, then torchrun's 30-line ChildFailedError traceback.
    with_params(workspace, lr=1000.0, muon_lr=1000.0)
    before = data_files(workspace)
    result = run(entry("launch"), workspace)
    error_line(result, "training diverged", "Fix: lower train.lr")
    # No model: data/ as it was (the live metric log in reports/train and the last good checkpoint stay, by design).
    assert data_files(workspace) == before


def test_a_truncated_checkpoint_is_discarded_in_one_line_and_training_starts_over(workspace):
    checkpoint = workspace / "checkpoints/pretrain/last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes((workspace / "data/model/model.pt").read_bytes()[:100])  # a torch file, cut short
    result = run(entry("launch"), workspace)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    notices = [line for line in output.splitlines() if "checkpoint" in line and "discarding" in line]
    assert len(notices) == 1 and notices[0].startswith("checkpoint: discarding checkpoints/pretrain/last.pt: "
                                                       "unreadable (") and "starting from step 0" in notices[0]
    assert "| from step 0" in output and not checkpoint.exists()


def test_a_checkpoint_damaged_inside_is_discarded_not_resumed(tmp_path, capsys):
    # torch.load reads most damaged weights without a word: the file's own sha256 catches them.
    from tinylm.training.checkpoint import fingerprint, load_checkpoint, save_checkpoint

    inputs = {"run": "the same"}
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"fingerprint": fingerprint(inputs), "weights": torch.arange(20_000.0)})
    assert load_checkpoint(path, inputs)["weights"].equal(torch.arange(20_000.0))
    data = bytearray(path.read_bytes())
    data[40_000:44_096] = bytes(4096)  # 4 KB in the middle zeroed
    path.write_bytes(bytes(data))
    assert load_checkpoint(path, inputs) is None and not path.exists()
    assert capsys.readouterr().out.splitlines() == [
        f"checkpoint: discarding {path}: unreadable (ValueError: its sha256 does not match its contents: the file is "
        "damaged); starting from step 0"]
