"""Records: the JSON files stages hand each other, each written and read through one dataclass.

Every record here is built by its producer's own code (on a few stories and a tiny model) and must
read back equal to itself, in the same bytes for the same values. A file that does not fit its
record fails with one line naming the file, the key and `dvc repro <stage>`. The reports committed
in reports/ must still read as their records and rewrite to the same bytes: a record change that
would alter them, or leave them unreadable, fails here in seconds instead of at the report stage.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tinylm.config import SampleParams, parse_params
from tinylm.corpus import sources
from tinylm.corpus.clean import SplitReport, clean_split
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.errors import PipelineError
from tinylm.evaluate import evaluate
from tinylm.files import write_json
from tinylm.generation.sweep import run_sweep
from tinylm.model import GPT, GPTConfig, load_trained_model, save_trained_model
from tinylm.records.clean import CleanReport, CleanSplit
from tinylm.records.download import Provenance
from tinylm.records.shards import CheckedShardSplit, ShardsReport
from tinylm.records.evaluation import EvalReport
from tinylm.records.io import read_record, read_records, write_record, write_records
from tinylm.records.model import ModelSummary, TrainingSummary
from tinylm.records.sampling import GeneratedSample, SamplingReport
from tinylm.records.tokenizer import TokenizerReport
from tinylm.report.inputs import TrainMetrics
from tinylm.tokenizer.bpe import EOT, Tokenizer
from tinylm.tokenizer.compare import tokenizer_report
from tinylm.tokenizer.fast_encode import ParallelEncoder, encode_split
from tinylm.tokenizer.train import train_bpe
from tinylm.training.metrics_log import MetricLog

SAMPLE_FILES = {"train": "TinyStories-train-sample.txt", "validation": "TinyStories-valid-sample.txt"}
# The reports the pipeline committed, with their records; metrics.json is dvclive's (not our bytes).
COMMITTED = [("reports/clean.json", CleanReport, "clean"), ("reports/shards.json", ShardsReport, "encode_shards"),
             ("reports/tokenizer.json", TokenizerReport, "train_bpe"), ("reports/eval.json", EvalReport, "evaluate_ppl"),
             ("reports/sampling.json", SamplingReport, "sample_sweep")]


@pytest.fixture(scope="module")
def params(repo_root, shared_dir):
    """The repository's params, reading a few stories of the offline sample files."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["data"] = {**copy.deepcopy(raw["data"]), "max_train_stories": 60, "max_val_stories": 20,
                   "sources": [{split: str(shared_dir / "data/tinystories" / name)
                                for split, name in SAMPLE_FILES.items()}]}
    return parse_params(raw)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory, params) -> Path:
    """data/raw as download writes it, and data/clean/{train,val}.txt as the clean stage would."""
    root = tmp_path_factory.mktemp("records")
    sources.download(params.data, root / "raw", log=lambda _: None)
    for split in ("train", "val"):
        stories = (json.loads(line)["text"] for line in (root / f"raw/{split}.jsonl").read_text().splitlines())
        write_eot_stories(root / f"clean/{split}.txt", stories)
    return root


@pytest.fixture(scope="module")
def tokenizer(clean_dir) -> Tokenizer:
    return Tokenizer(*train_bpe(clean_dir / "clean/train.txt", 300, [EOT]), [EOT])


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)).eval()


def tokens(clean_dir: Path, tokenizer: Tokenizer, split: str) -> np.ndarray:
    return np.array(tokenizer.encode((clean_dir / f"clean/{split}.txt").read_text(encoding="utf-8")), dtype=np.uint16)


def training_summary(model: GPT, tokenizer: Tokenizer) -> TrainingSummary:
    """What stages/pretrain.py hands save_trained_model, for a model trained 3 steps of 64 tokens."""
    return TrainingSummary(config=dataclasses.asdict(model.config), params=model.num_params(),
                           params_without_embeddings=model.num_params(include_embeddings=False), steps=3,
                           tokens_trained=192, final_train_loss=5.25, final_val_loss=5.5,
                           tokenizer_fingerprint=tokenizer.fingerprint)


def sweep(model: GPT, tokenizer: Tokenizer) -> tuple[list[GeneratedSample], SamplingReport]:
    return run_sweep(model, tokenizer, SampleParams(
        prompts=["Once upon a time"], num_samples=2, max_new_tokens=4, seed=0, temperatures=[1.0], top_k=[5],
        top_p=[0.9], min_p=0.1, beam_width=2, length_penalty=1.0, contrastive_k=2, contrastive_alpha=0.5))


@pytest.fixture(scope="module")
def produced(clean_dir, params, tokenizer, model, shared_dir) -> dict[str, tuple[object, object, str]]:
    """Each record file's name -> (the record its producer made, its record type, the stage that writes it)."""
    provenance = sources.download(params.data, clean_dir / "raw-again", log=lambda _: None)

    train, val = SplitReport(), SplitReport()
    stories = list(itertools.islice(iter_eot_stories(shared_dir / "data/tinystories" / SAMPLE_FILES["train"]), 8))
    list(clean_split(stories[:5] + ["", stories[0]], params.clean, [EOT], train))
    list(clean_split(stories[5:], params.clean, [EOT], val))
    clean = CleanReport(train=train.record(), val=val.record())

    with ParallelEncoder(tokenizer, workers=1) as encoder:
        split_records = {split: encode_split(encoder, iter_eot_stories(clean_dir / f"clean/{split}.txt"),
                                             clean_dir / "shards", split, 4096).record() for split in ("train", "val")}
    shards = ShardsReport(vocab_size=tokenizer.vocab_size, train=split_records["train"], val=CheckedShardSplit(
        **dataclasses.asdict(split_records["val"]), checked_documents=split_records["val"].documents))

    val_text = (clean_dir / "clean/val.txt").read_text(encoding="utf-8")
    stats = tokenizer_report(tokenizer, 0.125, clean_dir / "clean/train.txt", val_text, [256, 300],
                             compare_max_bytes=10_000, log=lambda _: None)
    evaluation = evaluate(model, tokens(clean_dir, tokenizer, "val")[:100], [tokens(clean_dir, tokenizer, "train")],
                          tokenizer, stride=8, batch_size=4, init_seed=0)
    _, sampling = sweep(model, tokenizer)
    return {"provenance.json": (provenance, Provenance, "download"), "clean.json": (clean, CleanReport, "clean"),
            "shards.json": (shards, ShardsReport, "encode_shards"),
            "tokenizer.json": (stats, TokenizerReport, "train_bpe"),
            "model.json": (save_trained_model(model, clean_dir / "model", training_summary(model, tokenizer)),
                           ModelSummary, "pretrain"),
            "eval.json": (evaluation, EvalReport, "evaluate_ppl"),
            "sampling.json": (sampling, SamplingReport, "sample_sweep")}


NAMES = ["provenance.json", "clean.json", "shards.json", "tokenizer.json", "model.json", "eval.json", "sampling.json"]


@pytest.mark.parametrize("name", NAMES)
def test_a_producers_record_reads_back_equal_and_rewrites_the_same_bytes(produced, name, tmp_path):
    record, kind, stage = produced[name]
    write_record(tmp_path / name, record)
    again = read_record(tmp_path / name, kind, stage)
    assert again == record
    write_record(tmp_path / f"again-{name}", again)
    assert (tmp_path / f"again-{name}").read_bytes() == (tmp_path / name).read_bytes()


def test_the_producers_fill_what_the_readers_look_at(produced):
    provenance, clean, shards = (produced[name][0] for name in ("provenance.json", "clean.json", "shards.json"))
    assert provenance.kind == "files" and provenance.revision is None
    assert (provenance.splits.train.stories, provenance.splits.val.stories) == (60, 20)
    assert clean.train.stories_in == 7 and clean.train.dropped["empty"] == 1 and clean.train.dropped["duplicate"] == 1
    assert shards.val.checked_documents == shards.val.documents == 20
    tokenizer_stats = produced["tokenizer.json"][0]
    assert tokenizer_stats.gpt2 is not None and set(tokenizer_stats.vocab_sizes) == {"256", "300"}
    assert "".join(tokenizer_stats.examples["strawberry"].ours) == "strawberry"


def test_dict_order_does_not_change_the_bytes(tmp_path):
    counts = {"empty": 1, "duplicate": 2, "too_short": 3}
    forward = CleanSplit(stories_in=9, stories_out=3, mojibake_repaired=0, dropped=counts)
    backward = dataclasses.replace(forward, dropped=dict(reversed(counts.items())))
    write_record(tmp_path / "a.json", CleanReport(train=forward, val=forward))
    write_record(tmp_path / "b.json", CleanReport(train=backward, val=backward))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_samples_read_back_line_by_line(model, tokenizer, tmp_path):
    samples, _ = sweep(model, tokenizer)
    assert any(sample.seed is None for sample in samples) and any(sample.seed == 1 for sample in samples)
    write_records(tmp_path / "samples.jsonl", samples)
    assert read_records(tmp_path / "samples.jsonl", GeneratedSample, "sample_sweep") == samples
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"seed"', '"seeds"')
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PipelineError, match=r"samples\.jsonl:2: has no key 'seed'.*dvc repro sample_sweep"):
        read_records(tmp_path / "samples.jsonl", GeneratedSample, "sample_sweep")


def test_dvclive_metrics_are_read_for_the_keys_the_report_uses(tmp_path):
    log = MetricLog(tmp_path, [], enabled=True)
    log.summary(batch_tokens=64, params=1000)
    log.write(0, train_loss=5.0, elapsed_s=1.5)
    log.finish()
    assert read_record(tmp_path / "metrics.json", TrainMetrics, "pretrain",
                       ignore_other_keys=True) == TrainMetrics(batch_tokens=64, elapsed_s=1.5)
    with pytest.raises(PipelineError, match="has an unknown key 'params'"):
        read_record(tmp_path / "metrics.json", TrainMetrics, "pretrain")


def test_model_json_records_the_sha256_of_model_pt_and_its_extra_the_rest(model, tokenizer, tmp_path):
    summary = training_summary(model, tokenizer)
    record = save_trained_model(model, tmp_path, summary)
    assert record.model_sha256 == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    assert read_record(tmp_path / "model.json", ModelSummary, "pretrain") == record
    assert dataclasses.asdict(record) == {**dataclasses.asdict(summary), "model_sha256": record.model_sha256}
    extra = torch.load(tmp_path / "model.pt", weights_only=True)["extra"]
    assert extra == dataclasses.asdict(summary)  # the file cannot hold its own hash


def test_load_trained_model_reads_model_json_as_its_record(model, tokenizer, tmp_path):
    save_trained_model(model, tmp_path, training_summary(model, tokenizer))
    assert load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu")).config == model.config
    broken = json.loads((tmp_path / "model.json").read_text())
    broken["tokenizer_fingerprint"] = None
    write_json(tmp_path / "model.json", broken)
    with pytest.raises(PipelineError, match="key 'tokenizer_fingerprint' holds null, not str.*dvc repro pretrain"):
        load_trained_model(tmp_path, tokenizer.fingerprint, torch.device("cpu"))


def _drop(key: str):
    def edit(data: dict) -> None:
        *parents, last = key.split(".")
        for parent in parents:
            data = data[parent]
        del data[last]
    return edit


def _set(key: str, value):
    def edit(data: dict) -> None:
        data[key] = value
    return edit


@pytest.mark.parametrize("edit, problem", [
    (_drop("val_bpb"), "has no key 'val_bpb'"),
    (_drop("baselines.unigram.ppl"), "has no key 'baselines.unigram.ppl'"),
    (_set("val_pplx", 1.0), "has an unknown key 'val_pplx'"),
    (_set("stride", "16"), "key 'stride' holds \"16\", not int"),
    (_set("block_size", True), "key 'block_size' holds true, not int"),
    (_set("val_loss", None), "key 'val_loss' holds null, not float"),
    (_set("baselines", [1, 2]), "key 'baselines' holds \\[1, 2\\], not an object"),
])
def test_a_file_that_does_not_fit_its_record_names_the_file_the_key_and_the_stage(produced, tmp_path, edit, problem):
    path = tmp_path / "reports/eval.json"
    write_record(path, produced["eval.json"][0])
    data = json.loads(path.read_text())
    edit(data)
    write_json(path, data)
    with pytest.raises(PipelineError, match=f"^{path}: {problem}.*fix: run `dvc repro evaluate_ppl`$"):
        read_record(path, EvalReport, "evaluate_ppl")


def test_a_generic_record_checks_the_type_it_is_bound_to(produced, tmp_path):
    path = tmp_path / "data/raw/provenance.json"
    write_record(path, produced["provenance.json"][0])
    data = json.loads(path.read_text())
    data["splits"]["val"]["stories"] = "20"
    write_json(path, data)
    with pytest.raises(PipelineError, match=r"key 'splits.val.stories' holds \"20\", not int.*dvc repro download"):
        read_record(path, Provenance, "download")


def test_a_union_field_accepts_each_of_its_types_and_nothing_else(model, tokenizer, tmp_path):
    samples, _ = sweep(model, tokenizer)
    sampled = next(sample for sample in samples if sample.params["strategy"] == "sample")
    assert {type(value) for value in sampled.params.values()} >= {str, float, type(None)}
    write_records(tmp_path / "samples.jsonl", [dataclasses.replace(sampled, params={"top_k": [5]})])
    with pytest.raises(PipelineError, match=r"key 'params.top_k' holds \[5\], not str or int or float or null"):
        read_records(tmp_path / "samples.jsonl", GeneratedSample, "sample_sweep")


def test_an_integer_reads_into_a_float_field_as_a_float(produced, tmp_path):
    path = tmp_path / "eval.json"
    write_record(path, dataclasses.replace(produced["eval.json"][0], val_loss=3))
    assert type(read_record(path, EvalReport, "evaluate_ppl").val_loss) is float


def test_invalid_json_and_a_missing_file_name_the_file_and_the_stage(tmp_path):
    path = tmp_path / "reports/shards.json"
    with pytest.raises(PipelineError, match=f"^{path}: missing.*fix: run `dvc repro encode_shards`$"):
        read_record(path, ShardsReport, "encode_shards")
    path.parent.mkdir()
    path.write_text('{"vocab_size": 300,')
    with pytest.raises(PipelineError, match=f"^{path}: not valid JSON .*fix: run `dvc repro encode_shards`$"):
        read_record(path, ShardsReport, "encode_shards")


@pytest.mark.parametrize("relative, kind, stage", COMMITTED, ids=[path for path, _, _ in COMMITTED])
def test_the_committed_reports_read_as_their_records_and_rewrite_to_the_same_bytes(repo_root, tmp_path, relative,
                                                                                     kind, stage):
    record = read_record(repo_root / relative, kind, stage)
    write_record(tmp_path / "rewritten.json", record)
    assert (tmp_path / "rewritten.json").read_bytes() == (repo_root / relative).read_bytes()


def test_the_committed_samples_and_training_metrics_read_as_their_records(repo_root, tmp_path):
    samples = read_records(repo_root / "reports/samples.jsonl", GeneratedSample, "sample_sweep")
    write_records(tmp_path / "samples.jsonl", samples)
    assert (tmp_path / "samples.jsonl").read_bytes() == (repo_root / "reports/samples.jsonl").read_bytes()
    metrics = read_record(repo_root / "reports/train/metrics.json", TrainMetrics, "pretrain", ignore_other_keys=True)
    assert metrics.batch_tokens > 0 and math.isfinite(metrics.elapsed_s)
