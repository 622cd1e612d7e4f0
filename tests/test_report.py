"""The report stage on a small but well-formed set of pipeline outputs.

The outputs are made by the producers' own code where it is cheap (BPE training, save_trained_model, the
dvclive metric log, evaluate, the sampling sweep) and otherwise built by hand as the stages' typed
records (tinylm/records/), written as the stages write them: a renamed record field fails here.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm.tokenizer.bpe import Tokenizer
from tinylm.tokenizer.train import train_bpe
from tinylm.config import SampleParams, load_params
from tinylm.corpus.formats import write_eot_stories
from tinylm.evaluate import evaluate
from tinylm.files import write_json
from tinylm.records.clean import CleanReport, CleanSplit
from tinylm.records.download import DownloadedSplit, Provenance
from tinylm.records.environment import current_environment
from tinylm.records.shards import CheckedShardSplit, ShardSplit, ShardsReport
from tinylm.records.splits import Splits
from tinylm.records.io import write_record, write_records
from tinylm.records.model import TrainingSummary
from tinylm.records.tokenizer import Compression, ExampleTokens, LearnedCompression, TokenizerReport
from tinylm.training.metrics_log import MetricLog
from tinylm.training.milestones import sample_milestone
from tinylm.model import GPT, GPTConfig, save_trained_model
from tinylm.report.sections import REPORT, architecture, build_report, escape, write_report
from tinylm.errors import PipelineError
from tinylm.generation.sweep import run_sweep

SECTIONS = ["## Data", "## Tokenizer", "## Model", "## Training", "## Evaluation", "## Sampling",
            "## Inside the model"]
PIPE_SAMPLE = "a cat | a dog\nand *more* <b>"
ATTENTION_TOKENS = 12
BATCH_TOKENS = 64
MILESTONE_STEPS = (0, 10, 15, 20)
CLEAN_REPORT = CleanReport(
    train=CleanSplit(stories_in=60, stories_out=52, mojibake_repaired=3,
                     dropped={"duplicate": 2, "too_short": 5, "truncated": 1}),
    val=CleanSplit(stories_in=12, stories_out=11, mojibake_repaired=0,
                   dropped={"duplicate": 0, "too_short": 1, "truncated": 0}),
)


def _stories(shared_dir: Path, count: int) -> list[str]:
    text = (shared_dir / "data/tinystories/TinyStories-valid-sample.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()][:count]


def make_pipeline_outputs(root: Path, shared_dir: Path) -> dict:
    """Every file the report stage reads, under root; returns the values the tests look for."""
    stories = _stories(shared_dir, 72)
    write_eot_stories(root / "data/clean/train.txt", stories[:60])
    write_eot_stories(root / "data/clean/val.txt", stories[60:])
    write_record(root / "data/raw/provenance.json", Provenance(
        source="../shared/data/tinystories", kind="folder", revision=None, source_sha256={},
        splits=Splits(train=DownloadedSplit(stories=60, bytes=1, sha256="0"),
                      val=DownloadedSplit(stories=12, bytes=1, sha256="0"))))
    write_record(root / "reports/clean.json", CLEAN_REPORT)

    vocab, merges = train_bpe(root / "data/clean/train.txt", 300, ["<|endoftext|>"])
    tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])
    tokenizer.save(root / "data/tokenizer")
    write_record(root / "reports/tokenizer.json", TokenizerReport(
        vocab_size=tokenizer.vocab_size, num_merges=len(merges), train_seconds=0.25, val_tokens=999,
        val_bytes_per_token=2.7182, fingerprint=tokenizer.fingerprint, compare_max_bytes=8_000_000, compare_bytes=40_000,
        hf_bpe=LearnedCompression(vocab_size=300, val_tokens=1040, val_bytes_per_token=2.6, vocab_overlap=0.9),
        hf_unigram=LearnedCompression(vocab_size=300, val_tokens=1080, val_bytes_per_token=2.5, vocab_overlap=0.6),
        hf_unigram_metaspace=LearnedCompression(vocab_size=300, val_tokens=1125, val_bytes_per_token=2.4,
                                                vocab_overlap=0.5),
        gpt2=Compression(vocab_size=50257, val_tokens=660, val_bytes_per_token=4.1),
        vocab_sizes={"256": Compression(vocab_size=257, val_tokens=5000, val_bytes_per_token=1.0),
                     "300": Compression(vocab_size=300, val_tokens=999, val_bytes_per_token=2.7182)},
        examples={word: ExampleTokens(ours=[tokenizer.decode([i]) for i in tokenizer.encode(word)], gpt2=[word])
                  for word in ("strawberry", " strawberry")},
    ))

    def encode(split: str) -> np.ndarray:
        text = (root / f"data/clean/{split}.txt").read_text(encoding="utf-8")
        return np.array(tokenizer.encode(text), dtype=np.uint16)

    train_tokens, val_tokens = encode("train"), encode("val")
    def shard_split(documents: int, tokens: np.ndarray) -> ShardSplit:
        return ShardSplit(documents=documents, tokens=len(tokens), text_bytes=3 * len(tokens), bytes_per_token=3.0,
                          shards=1, seconds=0.1, mb_per_s=1.0)

    write_record(root / "reports/shards.json", ShardsReport(
        vocab_size=tokenizer.vocab_size, train=shard_split(52, train_tokens),
        val=CheckedShardSplit(**dataclasses.asdict(shard_split(11, val_tokens)), checked_documents=11)))

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=3, d_model=24)
    model = GPT(config).eval()
    steps = 20
    summary = save_trained_model(model, root / "data/model", TrainingSummary(
        config=dataclasses.asdict(config), params=model.num_params(),
        params_without_embeddings=model.num_params(include_embeddings=False), steps=steps,
        tokens_trained=steps * BATCH_TOKENS, final_train_loss=4.5, final_val_loss=4.75,
        tokenizer_fingerprint=tokenizer.fingerprint))

    log = MetricLog(root / "reports/train", [], enabled=True)
    log.summary(batch_tokens=BATCH_TOKENS, params=summary.params,
                params_without_embeddings=summary.params_without_embeddings)
    for step in range(steps):
        if step % 10 == 0:
            log.write(step, val_loss=6.0 - step / 10)
        if step % 2 == 0:
            log.write(step, train_loss=6.0 - step / 8, lr=1e-3, grad_norm=2.0 / (step + 1), tokens=(step + 1) * 64,
                      tokens_per_s=1000.0 + step, mfu=0.01, elapsed_s=float(step))
    log.write(steps, val_loss=summary.final_val_loss)
    log.finish()
    # Milestones at the validation steps, and one (15) between them, which has no val loss to show.
    milestones = [row for step in MILESTONE_STEPS
                  for row in sample_milestone(model, tokenizer, ["Once upon a time"], 6, 0, step)]
    write_records(root / "reports/train/samples.jsonl", milestones)
    write_record(root / "data/model/environment.json", current_environment())

    report = evaluate(model, val_tokens[:200], [train_tokens], tokenizer, stride=16, batch_size=4, init_seed=0)
    write_record(root / "reports/eval.json", report)

    sample = SampleParams(prompts=["Once upon a time"], num_samples=2, max_new_tokens=6, seed=0,
                          temperatures=[1.0], top_k=[5], top_p=[0.9], min_p=0.1, beam_width=2, length_penalty=1.0,
                          contrastive_k=2, contrastive_alpha=0.5)
    records, metrics = run_sweep(model, tokenizer, sample)
    records[0] = dataclasses.replace(records[0], completion=PIPE_SAMPLE)
    write_records(root / "reports/samples.jsonl", records)
    write_record(root / "reports/sampling.json", metrics)
    return {"eval": report, "sampling": metrics, "summary": summary, "records": records, "config": config,
            "milestones": milestones}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared_dir) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pipeline")
    return root, make_pipeline_outputs(root, shared_dir)


@pytest.fixture(scope="module")
def params(repo_root):
    p = load_params(repo_root / "params.yaml")
    return dataclasses.replace(p, report=dataclasses.replace(p.report, sample_chars=40,
                                                             attention_tokens=ATTENTION_TOKENS))


@pytest.fixture(scope="module")
def written(pipeline, params) -> tuple[Path, str]:
    root, _ = pipeline
    (root / "reports/figures").mkdir(parents=True, exist_ok=True)
    (root / "reports/figures/stale.png").write_bytes(b"old")
    write_report(root, params)
    return root, (root / REPORT).read_text(encoding="utf-8")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_section_is_there_in_order(written):
    _, text = written
    positions = [text.find(f"\n{heading}\n") for heading in SECTIONS]
    assert all(p >= 0 for p in positions), [h for h, p in zip(SECTIONS, positions) if p < 0]
    assert positions == sorted(positions)


def test_links_point_at_existing_pngs_of_a_readable_size(written):
    root, text = written
    links = re.findall(r"\]\(([^)#]+)\)", text)
    images = re.findall(r"!\[[^\]]+\]\((figures/[^)]+\.png)\)", text)
    assert len(images) >= 8
    for link in links:
        assert (root / "reports" / link).is_file(), link
    for image in images:
        width, height = png_size(root / "reports" / image)
        assert 400 <= width <= 900 and 150 <= height <= 1400, (image, width, height)
    on_disk = {p.name for p in (root / "reports/figures").iterdir()}
    assert on_disk == {Path(image).name for image in images}  # the stale PNG is gone, no temp files


def test_tables_hold_the_numbers_of_the_inputs(written, pipeline):
    _, text = written
    _, made = pipeline
    ev, summary = made["eval"], made["summary"]
    assert f"**{ev.val_ppl:,.2f}**" in text
    assert f"| {ev.val_loss:,.4f} | {ev.val_ppl:,.2f} | {ev.val_bpb:,.4f} |" in text
    unigram = ev.baselines.unigram
    assert f"| {unigram.loss:,.4f} | {unigram.ppl:,.2f} | {unigram.bpb:,.4f} |" in text
    assert "| too_short | 5 | 1 |" in text and "| **total dropped** | 8 | 1 |" in text
    assert "| train | 60 | 52 | 3 |" in text
    assert f"| {summary.params:,} |" in text and f"| {summary.params_without_embeddings:,} |" in text
    assert f"| training tokens | {summary.tokens_trained:,} |" in text
    assert f"| tokens per parameter | {summary.tokens_trained / summary.params:,.2f} |" in text
    assert "| ours (BPE) | 300 | 2.718 |" in text and "| GPT-2 (tiktoken) | 50,257 | 4.100 |" in text
    for name, metrics in made["sampling"].items():
        assert f"| `{name}` | {metrics.distinct_1:,.3f} | {metrics.distinct_2:,.3f} |" in text
    assert "strawberry" in text and "3 r's" in text


def test_sample_text_is_escaped_and_trimmed_inside_its_table_cell(written, pipeline):
    _, text = written
    _, made = pipeline
    assert escape(PIPE_SAMPLE) in text
    (row,) = [line for line in text.splitlines() if "a cat \\| a dog" in line]
    cells = re.split(r"(?<!\\)\|", row)
    assert len(cells) == 5  # 3 cells between 4 unescaped pipes
    assert "<br>and \\*more\\* \\<b\\>" in row
    long_ones = [r for r in made["records"] if len(r.completion) > 40]
    for record in long_ones:
        assert escape(record.completion[:40].rstrip()) + "…" in text
    assert made["records"][0].prompt in text


def test_the_stories_table_shows_each_milestones_greedy_story_beside_its_val_loss(written, pipeline):
    _, text = written
    _, made = pipeline
    training = text[text.index("\n## Training\n"):text.index("\n## Evaluation\n")]
    assert "\n### How the stories improved\n" in training
    table_rows = [line for line in training.splitlines() if line.startswith("| ") and "**Once upon a time**" in line]
    greedy = [row for row in made["milestones"] if row.strategy == "greedy"]
    assert len(greedy) == len(MILESTONE_STEPS) and len(made["milestones"]) == 2 * len(MILESTONE_STEPS)
    val_losses = {0: "6.0000", 10: "5.0000", 15: "–", 20: "4.7500"}  # 20: the final validation
    assert [row.split(" | ")[:2] for row in table_rows] == [[f"| {s}", val_losses[s]] for s in MILESTONE_STEPS]
    for line, row in zip(table_rows, greedy):
        assert line.endswith(" | " + escape(row.prompt).join(["**", "**"]) + escape(row.text) + " |")
    assert "`reports/train/samples.jsonl`" in training


def test_a_run_without_milestones_says_so(pipeline, params, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pipeline[0], root)
    (root / "reports/train/samples.jsonl").write_text("")  # train.sample_interval: 0 writes an empty file
    text = build_report(root, params).markdown()
    assert "### How the stories improved\n\nNo stories were sampled during training" in text


def test_the_markdown_renders_as_tables_and_images(written):
    """Rendered by a CommonMark + GFM-tables parser (markdown-it, as GitHub's parser behaves on these)."""
    markdown_it = pytest.importorskip("markdown_it")
    _, text = written
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    tables = re.findall(r"<table>.*?</table>", html, re.S)
    assert len(tables) >= 10
    for rendered in tables:  # every row has as many cells as the header: no stray | split a cell
        assert len({len(re.findall(r"<t[dh]", row)) for row in re.findall(r"<tr>(.*?)</tr>", rendered, re.S)}) == 1
    assert len(re.findall(r'<img src="figures/[^"]+\.png"', html)) == len(re.findall(r"!\[", text))
    assert "<td><strong>Once upon a time</strong>a cat | a dog<br>and *more* &lt;b&gt;</td>" in html


def test_the_same_inputs_give_the_same_bytes(written, params):
    root, text = written
    figures = {p.name: p.read_bytes() for p in (root / "reports/figures").iterdir()}
    write_report(root, params)
    assert (root / REPORT).read_text(encoding="utf-8") == text
    assert {p.name: p.read_bytes() for p in (root / "reports/figures").iterdir()} == figures


def test_attention_figure_has_a_panel_per_head(pipeline, params):
    root, made = pipeline
    report = build_report(root, params)
    heatmaps = [ax for ax in report.figures["attention_heads.png"].axes if ax.images]
    assert len(heatmaps) == made["config"].n_layer * made["config"].n_head
    assert heatmaps[0].images[0].get_array().shape == (ATTENTION_TOKENS, ATTENTION_TOKENS)


@pytest.mark.parametrize("relative, stage", [
    ("reports/eval.json", "evaluate_ppl"),
    ("reports/train/plots/metrics/grad_norm.tsv", "pretrain"),
    ("data/raw/provenance.json", "download"),
    ("reports/samples.jsonl", "sample_sweep"),
    ("reports/train/samples.jsonl", "pretrain"),
    ("data/clean/val.txt", "clean"),
])
def test_a_missing_input_names_the_file_and_the_stage_to_rerun(pipeline, params, tmp_path, relative, stage):
    root = tmp_path / "copy"
    shutil.copytree(pipeline[0], root)
    (root / relative).unlink()
    with pytest.raises(PipelineError) as error:
        build_report(root, params)
    assert relative in str(error.value) and f"dvc repro {stage}" in str(error.value)


def test_a_missing_key_names_the_file_and_the_key(pipeline, params, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pipeline[0], root)
    broken = json.loads((root / "reports/eval.json").read_text())
    del broken["val_bpb"]
    write_json(root / "reports/eval.json", broken)
    with pytest.raises(PipelineError, match=r"reports/eval.json: has no key 'val_bpb'.*dvc repro evaluate_ppl"):
        build_report(root, params)


@pytest.mark.slow
def test_stage_script_writes_the_report_or_exits_2_with_the_error(pipeline, repo_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(pipeline[0], root)
    shutil.rmtree(root / "reports/figures", ignore_errors=True)
    (root / REPORT).unlink(missing_ok=True)
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    script = str(repo_root / "stages/report.py")
    sampling = (root / "reports/sampling.json").read_bytes()
    (root / "reports/sampling.json").unlink()
    failed = subprocess.run([sys.executable, script], cwd=root, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "error: reports/sampling.json: missing" in failed.stderr and "Traceback" not in failed.stderr
    assert not (root / REPORT).exists() and not (root / "reports/figures").exists()

    (root / "reports/sampling.json").write_bytes(sampling)
    done = subprocess.run([sys.executable, script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "## Inside the model" in (root / REPORT).read_text(encoding="utf-8")


def test_the_model_section_names_every_architecture_axis_from_the_saved_config():
    gpt2 = dataclasses.asdict(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, d_model=16))
    assert architecture(gpt2) == ("A decoder-only transformer: pre-LayerNorm blocks, learned positions, "
                                  "GELU MLP, LM head tied to the token embedding.")
    modern = dataclasses.asdict(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=4, d_model=16,
                                          positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True,
                                          tie_embeddings=False, n_kv_head=2, logit_softcap=15.0))
    described = architecture(modern)
    for phrase in ("pre-RMSNorm", "rotary positions", "ReLU² MLP", "untied LM head", "QK-norm",
                   "2 key/value heads for 4 query heads", "soft-capped at ±15"):
        assert phrase in described
