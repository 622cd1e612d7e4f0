"""The export stage: our GPT and BPE tokenizer as a transformers model + fast tokenizer, loaded with
AutoModelForCausalLM / AutoTokenizer (no custom code) and proven to compute what ours computes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from conftest import save_untrained_model
from test_bpe import DOUBLE_EOT, GPT2_EDGE_CASES
from tinylm.errors import PipelineError
from tinylm.export.hf_model import SKIPPED, NotExportable, export_hf, verify_export
from tinylm.export.hf_tokenizer import write_hf_tokenizer
from tinylm.generation.sampling import Greedy, generate
from tinylm.model import GPT, GPTConfig, load_trained_model
from tinylm.records.environment import Environment, current_environment
from tinylm.records.io import read_record
from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe

BLOCK = 64
# A small rotary base: with head_dim 8 and 64 positions every dimension pair turns noticeably, so a wrong
# rotation layout (interleaved pairs, another base) cannot hide behind near-zero angles.
ROTARY = dict(positions="rope", norm="rmsnorm", rope_theta=500.0)
MODERN = yaml.safe_load((Path(__file__).parent.parent / "conf/recipe/modern.yaml").read_text())["model"]
EXPORTABLE = {  # name -> (GPTConfig fields, the transformers model_type it exports as)
    "gpt2": ({}, "gpt2"),
    "gpt2-untied-no-bias": (dict(tie_embeddings=False, bias=False), "gpt2"),
    "gpt2-relu2-mlp_hidden": (dict(mlp="relu2", mlp_hidden=48), "gpt2"),
    "gpt-neox": (dict(positions="rope", rope_theta=500.0), "gpt_neox"),
    "gpt-neox-gelu-untied-no-bias": (dict(positions="rope", rope_theta=500.0, tie_embeddings=False, bias=False),
                                     "gpt_neox"),
    "llama-gqa-bias": (ROTARY | dict(mlp="swiglu", n_kv_head=2), "llama"),
    "qwen3-gqa": (ROTARY | dict(mlp="swiglu", qk_norm=True, n_kv_head=2, bias=False, tie_embeddings=False), "qwen3"),
    "arcee-relu2-bias": (ROTARY | dict(mlp="relu2"), "arcee"),
    "arcee-gelu-mqa": (ROTARY | dict(mlp="gelu", n_kv_head=1, bias=False), "arcee"),
    "apertus-modern-recipe": (MODERN, "apertus"),
    "apertus-gelu-gqa": (ROTARY | dict(mlp="gelu", qk_norm=True, n_kv_head=2, bias=False), "apertus"),
}
NOT_EXPORTABLE = {  # name -> (GPTConfig fields, what the message must name)
    "logit_softcap": (dict(logit_softcap=15.0), "model.logit_softcap=15.0"),
    "modern-recipe-with-softcap": (MODERN | dict(logit_softcap=30.0), "model.logit_softcap=30.0"),
    "learned-rmsnorm": (dict(norm="rmsnorm"), "model.norm=rmsnorm"),
    "learned-swiglu": (dict(mlp="swiglu"), "model.mlp=swiglu"),
    "learned-qk_norm": (dict(qk_norm=True), "model.qk_norm=true"),
    "learned-gqa": (dict(n_kv_head=2), "model.n_kv_head=2"),
    "rope-layernorm-swiglu": (dict(positions="rope", mlp="swiglu"), "model.mlp=swiglu"),
    "rope-layernorm-qk_norm": (dict(positions="rope", qk_norm=True), "model.qk_norm=true"),
    "rope-layernorm-gqa": (dict(positions="rope", n_kv_head=2), "model.n_kv_head=2"),
    "qwen3-with-bias": (ROTARY | dict(mlp="swiglu", qk_norm=True), "model.bias=true"),
    "apertus-with-bias": (ROTARY | dict(mlp="relu2", qk_norm=True), "model.bias=true"),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, shared_dir) -> Tokenizer:
    """Our BPE trained on ~300 kB of stories, with two overlapping special tokens (longest must win)."""
    text = (shared_dir / "data/tinystories/TinyStories-train-sample.txt").read_text(encoding="utf-8")[:300_000]
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(text, encoding="utf-8")
    return Tokenizer(*train_bpe(path, 600, [EOT, DOUBLE_EOT]), [EOT, DOUBLE_EOT])


def make_model(tokenizer: Tokenizer, fields: dict, seed: int = 0) -> GPT:
    """A tiny GPT whose every parameter is its init plus noise: GPT-2's init leaves norm gains at 1 and
    biases at 0, where a mapping that drops or misplaces them would still give the same logits."""
    torch.manual_seed(seed)
    size = dict(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=4, d_model=32)
    model = GPT(GPTConfig(**size | fields)).eval()  # the fields' own size (the modern recipe's layers) wins
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def greedy_pair(model: GPT, hf: PreTrainedModel, prompt: list[int], eot_id: int, steps: int) -> tuple[list, list]:
    """Greedy continuations of `prompt` by ours and by transformers' generate, each up to its <|endoftext|>."""
    ours = generate(model, prompt, Greedy(), steps, eot_id)[0]
    ids = torch.tensor([prompt])
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps)
    return ours.tokens + [eot_id] * ours.stopped_at_eot, theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", EXPORTABLE)
def test_transformers_computes_our_logits_and_greedy_continuations(name, tokenizer, tmp_path):
    fields, model_type = EXPORTABLE[name]
    model = make_model(tokenizer, fields)
    assert export_hf(model, tokenizer, tmp_path / "hf") == model_type
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == model_type

    ids = torch.randint(0, tokenizer.vocab_size, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() < 1e-4
    # The head is ours, tied to the embedding exactly when ours is.
    head, embedding = hf.get_output_embeddings().weight, hf.get_input_embeddings().weight
    assert torch.equal(head, model.lm_head.weight)
    assert (head.data_ptr() == embedding.data_ptr()) == model.config.tie_embeddings
    # Through transformers' own KV cache and generation loop.
    ours, theirs = greedy_pair(model, hf, tokenizer.encode("Once upon a time, there was"), tokenizer.eot_id, 30)
    assert len(theirs) > 0 and ours == theirs


def test_the_export_check_catches_logits_that_differ(tokenizer, tmp_path):
    model = make_model(tokenizer, {})
    export_hf(model, tokenizer, tmp_path / "hf")
    with torch.no_grad():
        model.ln_f.weight.mul_(1.01)  # as if one tensor were mapped wrongly
    with pytest.raises(PipelineError, match="logits differ from ours"):
        verify_export(model, tokenizer, tmp_path / "hf")


@pytest.mark.parametrize("name", NOT_EXPORTABLE)
def test_options_no_architecture_expresses_are_named(name, tokenizer, tmp_path):
    fields, named = NOT_EXPORTABLE[name]
    with pytest.raises(NotExportable, match=f"^{named}: .*; the transformers export is skipped$"):
        export_hf(make_model(tokenizer, fields), tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(tokenizer, directory, model_max_length=BLOCK)
    return directory


def test_auto_tokenizer_gives_our_ids_on_the_whole_validation_sample(tokenizer, hf_tokenizer_dir, shared_dir):
    text = (shared_dir / "data/tinystories/TinyStories-valid-sample.txt").read_text(encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    ids = tokenizer.encode(text)
    assert EOT in text and len(ids) > 100_000
    assert hf(text, verbose=False)["input_ids"] == ids
    assert hf.decode(ids) == text == tokenizer.decode(ids)


@pytest.mark.parametrize("text", GPT2_EDGE_CASES + [DOUBLE_EOT + EOT, f"a{DOUBLE_EOT}b{EOT}"])
def test_auto_tokenizer_gives_our_ids_on_edge_cases(text, tokenizer, hf_tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert hf(text)["input_ids"] == tokenizer.encode(text)
    assert hf.decode(tokenizer.encode(text)) == text


def test_auto_tokenizer_has_our_special_tokens_and_adds_none(tokenizer, hf_tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert hf.is_fast
    assert hf.eos_token == hf.bos_token == EOT
    assert hf.eos_token_id == hf.bos_token_id == tokenizer.eot_id
    assert hf.convert_tokens_to_ids(DOUBLE_EOT) == tokenizer.special_tokens[DOUBLE_EOT]
    assert hf("Hello")["input_ids"] == tokenizer.encode("Hello")  # no BOS, no EOS, no prefix space
    assert hf.decode(tokenizer.encode(f"Hi.{EOT}"), skip_special_tokens=True) == "Hi."
    assert hf.model_max_length == BLOCK


# ------------------------------------------------------------------ the stage


def workspace(root: Path, tokenizer: Tokenizer, model: GPT) -> Path:
    """data/tokenizer and data/model as train_bpe and pretrain write them."""
    tokenizer.save(root / "data/tokenizer")
    save_untrained_model(model, tokenizer, root / "data/model")
    return root


def run_export_stage(repo_root: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo_root / "stages/export.py")], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_stage_writes_a_model_transformers_loads_and_the_same_bytes_again(repo_root, tokenizer, tmp_path):
    root = workspace(tmp_path / "work", tokenizer, make_model(tokenizer, {}))
    result = run_export_stage(repo_root, root)
    assert result.returncode == 0, result.stderr
    assert "export: gpt2 model" in result.stdout
    out = root / "data/export/hf"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "environment.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    # The versions that wrote it (transformers puts its own into config.json), as the stage saw them.
    assert read_record(out / "environment.json", Environment, "export") == current_environment()

    hf_tokenizer, hf = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    prompt = hf_tokenizer("Once upon a time", return_tensors="pt")
    continuation = hf.generate(**prompt, do_sample=False, max_new_tokens=20)[0, prompt["input_ids"].shape[1]:]
    reloaded_tokenizer = load_tokenizer(root / "data/tokenizer")
    model = load_trained_model(root / "data/model", reloaded_tokenizer.fingerprint, torch.device("cpu"))
    ours, _ = greedy_pair(model, hf, reloaded_tokenizer.encode("Once upon a time"), tokenizer.eot_id, 20)
    assert continuation.tolist() == ours

    # The same inputs, exported again in this process: byte for byte what the stage wrote, so a
    # rerun changes nothing DVC tracks.
    export_hf(model, reloaded_tokenizer, tmp_path / "again")
    for path in out.iterdir():
        if path.name != "environment.json":  # written by the stage beside export_hf's files
            assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


def test_stage_writes_only_the_skip_marker_for_a_model_it_cannot_export(repo_root, tokenizer, tmp_path):
    root = workspace(tmp_path, tokenizer, make_model(tokenizer, dict(logit_softcap=15.0)))
    stale = root / "data/export/hf/model.safetensors"  # from an earlier, exportable model: must go
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    result = run_export_stage(repo_root, root)
    assert result.returncode == 0, result.stderr
    assert "model.logit_softcap=15.0" in result.stdout and "export is skipped" in result.stdout
    assert [p.name for p in (root / "data/export/hf").iterdir()] == [SKIPPED]
    assert "model.logit_softcap=15.0" in (root / "data/export/hf" / SKIPPED).read_text()


def test_dvc_yaml_declares_the_export_as_a_model_artifact(repo_root):
    pipeline = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    artifact = pipeline["artifacts"]["tinystories-gpt"]
    assert artifact["type"] == "model"
    assert artifact["path"] in pipeline["stages"]["export"]["outs"]  # DVC-tracked, so `dvc artifacts get` finds it
