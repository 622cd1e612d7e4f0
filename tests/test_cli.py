"""The `tinylm` console command (generate, score, tokenize) on tiny models made here, as a clean clone
has no data/model: a BPE tokenizer trained on a slice of the shared stories, random GPTs saved as the
pretrain stage saves them, and a hand-wired one that spells a text with emoji byte by byte.

Each user-facing flow runs the installed command in a subprocess. The matrices (every strategy,
every bad knob value) call `tinylm.cli.main.main` in-process instead: the same code from argv to
exit code, without a second of torch import per case.
"""
from __future__ import annotations

import io
import itertools
import math
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import run_cmd, save_untrained_model
from tinylm.cli.generate import DEFAULT_STRATEGY, Stream, escape_controls, strategy_from
from tinylm.cli.main import build_parser
from tinylm.cli.main import main
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.generation.sampling import Greedy, Sample, Strategy, decode
from tinylm.generation.search import Beam, Contrastive
from tinylm.model import GPT, GPTConfig, load_model
from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe

TINYLM = Path(sys.executable).parent / "tinylm"
BLOCK_SIZE = 32
PROMPT = "Once upon a time"
EMOJI_TEXT = "Zoë🙂"  # ë and 🙂 are 2 and 4 bytes that this small vocabulary does not merge
CONTROL_TEXT = "\x1b[2J\x07ok"  # an escape sequence that clears a terminal, and its bell


def tinylm(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The command's run, its output decoded strictly as UTF-8 and without newline translation (a random
    model's story may hold a \\r)."""
    result = subprocess.run([str(TINYLM), *args], cwd=cwd, input=None if stdin is None else stdin.encode(),
                            capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def fails(result: subprocess.CompletedProcess, *fixes: str) -> None:
    """A user error: exit code 2, nothing on stdout, one line on stderr naming each fix, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    for fix in fixes:
        assert fix in result.stderr


def save_trained(model: GPT, tokenizer: Tokenizer, directory: Path) -> Path:
    """model.pt and model.json, as stages/pretrain.py writes them."""
    return save_untrained_model(model, tokenizer, directory)


def random_model(tokenizer: Tokenizer, seed: int, logit_scale: float = 1.0) -> GPT:
    """A random GPT; logit_scale > 1 spreads its logits, so that some next tokens are far less likely than others."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE, n_layer=1, n_head=2, d_model=16))
    with torch.no_grad():
        model.wte.weight.mul_(logit_scale)  # the tied LM head
    return model


def spelling_model(tokenizer: Tokenizer, after: int, chain: list[int]) -> GPT:
    """A model whose next token depends on the last one only: `after` -> chain[0] -> ... -> <|endoftext|>.

    Attention and MLP outputs are zero, so the final hidden state is LayerNorm(embedding of the last
    token); each token of the chain gets its own embedding axis, and the LM head row of its successor
    reads that axis, so the successor gets all the probability."""
    sources, targets = [after, *chain], [*chain, tokenizer.eot_id]
    assert len(set(sources)) == len(sources) <= 16
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE, n_layer=1, n_head=2,
                          d_model=16, tie_embeddings=False))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
        for axis, (source, target) in enumerate(zip(sources, targets)):
            model.wte.weight[source, axis] = 1.0
            model.lm_head.weight[target, axis] = 10.0
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_dir) -> Path:
    """data/tokenizer + data/model (seed 1), b/model (seed 2), peaked/model (its logits spread wide), spell/model,
    control/model (spells CONTROL_TEXT) and other/tokenizer (another vocab), in a folder the command takes for the
    repository root (it holds a .dvc/)."""
    root = tmp_path_factory.mktemp("cli")
    (root / ".dvc").mkdir()
    stories = list(itertools.islice(iter_eot_stories(shared_dir / "data/tinystories/TinyStories-valid-sample.txt"),
                                    150))
    write_eot_stories(root / "train.txt", stories)
    (root / "story.txt").write_text("\n\n".join(stories[:3]), encoding="utf-8")
    for directory, vocab_size in (("data/tokenizer", 300), ("other/tokenizer", 290)):
        Tokenizer(*train_bpe(root / "train.txt", vocab_size, [EOT]), [EOT]).save(root / directory)
    tokenizer = load_tokenizer(root / "data/tokenizer")
    save_trained(random_model(tokenizer, seed=1), tokenizer, root / "data/model")
    save_trained(random_model(tokenizer, seed=2), tokenizer, root / "b/model")
    save_trained(random_model(tokenizer, seed=3, logit_scale=10.0), tokenizer, root / "peaked/model")
    after = tokenizer.encode("Hi.")[-1]
    save_trained(spelling_model(tokenizer, after, tokenizer.encode(EMOJI_TEXT)), tokenizer, root / "spell/model")
    save_trained(spelling_model(tokenizer, after, tokenizer.encode(CONTROL_TEXT)), tokenizer, root / "control/model")
    return root


@pytest.fixture(scope="module")
def tokenizer(work) -> Tokenizer:
    return load_tokenizer(work / "data/tokenizer")


def story(model_dir: Path, tokenizer: Tokenizer, strategy: Strategy, seed: int = 0, max_new_tokens: int = 20,
          prompt: str = PROMPT) -> str:
    """What `tinylm generate` must print, computed without it: the prompt and decode's tokens, not streamed."""
    generation, = decode(load_model(model_dir / "model.pt"), [tokenizer.eot_id, *tokenizer.encode(prompt)], strategy,
                         max_new_tokens, tokenizer.eot_id, [seed])
    return prompt + tokenizer.decode(generation.tokens) + "\n"


# --------------------------------------------------------------------------------------------- generate


def test_a_sample_depends_on_its_seed_only_and_equals_the_library_call(work, tokenizer):
    two = tinylm("generate", "--num-samples", "2", "--max-new-tokens", "20", PROMPT, cwd=work)
    one = tinylm("generate", "--seed", "1", "--max-new-tokens", "20", PROMPT, cwd=work)
    assert two.returncode == 0 and one.returncode == 0, two.stderr + one.stderr
    first, second = (story(work / "data/model", tokenizer, DEFAULT_STRATEGY, seed) for seed in (0, 1))
    assert two.stdout == f"--- sample 1/2, seed 0 ---\n{first}--- sample 2/2, seed 1 ---\n{second}"
    assert one.stdout == second  # seed 1 again, in another process and alone in its batch
    assert first != second


STRATEGIES = {
    "greedy": (["--strategy", "greedy"], Greedy()),
    "temperature": (["--temperature", "0.7"], Sample(temperature=0.7)),
    "top-k": (["--top-k", "5"], Sample(top_k=5)),
    "top-p": (["--top-p", "0.8", "--temperature", "1.3"], Sample(temperature=1.3, top_p=0.8)),
    "min-p": (["--min-p", "0.1"], Sample(min_p=0.1)),
    "beam": (["--strategy", "beam", "--beam-width", "3", "--length-penalty", "0.5"], Beam(3, 0.5)),
    "contrastive": (["--contrastive-k", "3", "--alpha", "0.4"], Contrastive(3, 0.4)),
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_streams_what_decode_returns(work, tokenizer, capsys, monkeypatch, name):
    flags, strategy = STRATEGIES[name]
    monkeypatch.chdir(work)
    assert main(["generate", *flags, "--seed", "3", "--max-new-tokens", "20", PROMPT]) == 0
    assert capsys.readouterr().out == story(work / "data/model", tokenizer, strategy, seed=3)


@pytest.mark.parametrize("flags, strategy", [
    ([], Sample(min_p=0.05)),  # what the README recommends for reading stories
    (["--seed", "3", "--max-new-tokens", "9"], Sample(min_p=0.05)),  # not strategy flags
    (["--strategy", "sample"], Sample()),  # the model's raw distribution
    (["--strategy", "sample", "--temperature", "1"], Sample()),
    (["--temperature", "0.7"], Sample(temperature=0.7)),  # only the knobs given: min-p is off
    (["--min-p", "0.2"], Sample(min_p=0.2)),
])
def test_the_default_is_min_p_and_any_strategy_flag_means_only_the_flags_given(flags, strategy):
    assert strategy_from(build_parser("generate").parse_args(["generate", *flags, PROMPT])) == strategy


def test_the_default_story_is_min_p_sampling_and_strategy_sample_the_raw_distribution(work, tokenizer):
    peaked = work / "peaked/model"  # about half of its next tokens are < 5% as likely as the likeliest
    model = ["--model", str(peaked), "--tokenizer", str(work / "data/tokenizer"), "--max-new-tokens", "30"]
    default = tinylm("generate", *model, PROMPT, cwd=work)
    raw = tinylm("generate", *model, "--strategy", "sample", "--temperature", "1", PROMPT, cwd=work)
    assert default.returncode == raw.returncode == 0, default.stderr + raw.stderr
    assert default.stdout == story(peaked, tokenizer, Sample(min_p=0.05), max_new_tokens=30)
    assert raw.stdout == story(peaked, tokenizer, Sample(), max_new_tokens=30)
    assert default.stdout != raw.stdout  # the case under test: min-p cuts the tokens this model finds unlikely


def test_no_cache_decodes_the_same_tokens(work, tokenizer, capsys, monkeypatch):
    monkeypatch.chdir(work)
    assert main(["generate", "--no-cache", "--strategy", "greedy", "--max-new-tokens", "40", PROMPT]) == 0
    assert capsys.readouterr().out == story(work / "data/model", tokenizer, Greedy(), max_new_tokens=40)


def test_on_step_reports_each_token_as_it_is_chosen(work, tokenizer):
    model, prompt = load_model(work / "data/model/model.pt"), [tokenizer.eot_id, *tokenizer.encode(PROMPT)]
    for strategy, seeds in ((Sample(), [4, 5]), (Contrastive(), [0])):
        steps: list[list[int]] = []
        generations = decode(model, prompt, strategy, 15, None, seeds, on_step=lambda t: steps.append(t.tolist()))
        assert [list(row) for row in zip(*steps)] == [g.tokens for g in generations]
    with pytest.raises(ValueError, match="beam search"):
        decode(model, prompt, Beam(), 5, None, on_step=lambda t: None)


def test_stream_holds_back_the_bytes_of_an_unfinished_character(tokenizer):
    out = io.StringIO()
    stream = Stream(tokenizer, out)
    emoji = tokenizer.encode("🙂")
    assert len(emoji) == 4  # one byte per token
    for count, token in enumerate(emoji, start=1):
        stream(torch.tensor([token]))
        assert out.getvalue() == ("🙂" if count == 4 else "")
    stream(torch.tensor([tokenizer.eot_id]))
    stream(torch.tensor([emoji[0]]))  # after <|endoftext|>, a finished row's tokens are not the story's
    stream.close()
    assert out.getvalue() == "🙂\n"


def test_characters_split_across_tokens_print_whole_and_it_stops_at_endoftext(work, tokenizer):
    chain = tokenizer.encode(EMOJI_TEXT)
    assert any(not _is_utf8(tokenizer.decode_bytes([t])) for t in chain)  # the case under test
    result = subprocess.run([str(TINYLM), "generate", "--model", str(work / "spell/model"), "--tokenizer",
                             str(work / "data/tokenizer"), "--strategy", "greedy", "--show-probs", "Hi."],
                            cwd=work, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("utf-8")  # strict: a broken character would raise
    printed, table = text.split("\n\n")
    assert printed == "Hi." + tokenizer.decode(chain) == "Hi." + EMOJI_TEXT
    rows = table.splitlines()[2:]
    assert [row.split()[2] for row in rows] == [*(tokenizer.decode_bytes([t]).decode("utf-8", "backslashreplace")
                                                  for t in chain), EOT]
    assert all(float(row.split()[1]) > 0.999 and "unlikely" not in row for row in rows)


def test_escape_controls_keeps_newlines_tabs_and_every_printable_character():
    assert escape_controls("a\tb\nZoë🙂 \u00a0é") == "a\tb\nZoë🙂 \u00a0é"
    assert escape_controls("\x1b[2J\r\x07\x00\x7f\x9b") == "\\x1b[2J\\r\\x07\\x00\\x7f\\x9b"


def generate_on_a_terminal(work: Path, *args: str) -> bytes:
    """What `tinylm generate` writes when its stdout is a terminal (a pseudo-terminal here), newlines as sent."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([str(TINYLM), "generate", *args], cwd=work, stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"})
    os.close(terminal)
    seen = bytearray()
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 60)
            assert ready, f"no output within 60 s; got {bytes(seen)!r}"
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    return bytes(seen).replace(b"\r\n", b"\n")  # the terminal's own line endings


def test_control_characters_in_a_story_are_escaped_on_a_terminal_unless_raw(work):
    model = ["--model", str(work / "control/model"), "--tokenizer", str(work / "data/tokenizer"), "--strategy",
             "greedy", "Hi."]
    assert generate_on_a_terminal(work, *model) == b"Hi.\\x1b[2J\\x07ok\n"
    assert generate_on_a_terminal(work, "--raw", *model) == f"Hi.{CONTROL_TEXT}\n".encode()
    piped = tinylm("generate", *model, cwd=work)  # a pipe or a file gets the text as it is
    assert piped.returncode == 0 and piped.stdout == f"Hi.{CONTROL_TEXT}\n", piped.stderr


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_prompt_from_stdin_and_show_probs(work, tokenizer):
    result = tinylm("generate", "--seed", "2", "--max-new-tokens", "12", "--show-probs", "--low-prob", "0.01",
                    cwd=work, stdin=PROMPT + "\n")
    assert result.returncode == 0, result.stderr
    printed, table = result.stdout.split("\n\n")
    assert printed + "\n" == story(work / "data/model", tokenizer, DEFAULT_STRATEGY, seed=2, max_new_tokens=12)
    generation, = decode(load_model(work / "data/model/model.pt"), [tokenizer.eot_id, *tokenizer.encode(PROMPT)],
                         DEFAULT_STRATEGY, 12, tokenizer.eot_id, [2])
    rows = table.splitlines()[2:]
    assert len(rows) == len(generation.logprobs)
    for row, logprob in zip(rows, generation.logprobs):
        p = math.exp(logprob)
        assert float(row.split()[1]) == pytest.approx(p, abs=6e-5)
        assert row.endswith("<- unlikely") == (p < 0.01)
    assert any(row.endswith("<- unlikely") for row in rows)  # a random model over 300 tokens surprises itself


def _read_until(fd: int, marker: bytes, seen: bytearray, count: int) -> None:
    while seen.count(marker) < count:
        ready, _, _ = select.select([fd], [], [], 60)
        assert ready, f"no {marker!r} within 60 s; got {bytes(seen)!r}"
        seen += os.read(fd, 4096)


def test_interactive_loop_tells_a_story_per_line_and_quits_cleanly(work, tokenizer):
    """On a terminal with no prompt: a story per line; Ctrl-D (EOF) quits, and so does Ctrl-C at the prompt."""
    expected = story(work / "data/model", tokenizer, Greedy(), max_new_tokens=10)
    for quit_with in ("eof", "ctrl-c"):
        controller, terminal = pty.openpty()
        process = subprocess.Popen([str(TINYLM), "generate", "--strategy", "greedy", "--max-new-tokens", "10"],
                                   cwd=work, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"},
                                   # As a shell runs a command from the terminal: SIGINT is not inherited ignored
                                   # (which a background job's would be), so Python turns it into KeyboardInterrupt.
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(terminal)
        seen = bytearray()
        try:
            os.write(controller, f"{PROMPT}\n\n{PROMPT}\n".encode())
            _read_until(process.stdout.fileno(), b"> ", seen, 4)  # two stories, a skipped empty line, a new prompt
            if quit_with == "eof":
                os.write(controller, b"\x04")
            else:
                # A SIGINT that lands right after the prompt is written, before the read blocks, is seen only
                # once the read returns (sent at once, it did so every time): wait as a person would, and
                # press Ctrl-C again if the command has not quit.
                time.sleep(0.5)
                for _ in range(10):
                    process.send_signal(signal.SIGINT)
                    try:
                        process.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            output, errors = process.communicate(timeout=60)
        finally:
            os.close(controller)
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, errors
        assert (bytes(seen) + output).decode() == f"> {expected}> > {expected}> "
        assert b"Traceback" not in errors


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_naming_the_fix(work):
    before = sorted(work.rglob("*"))
    fails(tinylm("generate", "--model", str(work / "nowhere"), PROMPT, cwd=work), "dvc repro pretrain", "dvc pull")
    fails(tinylm("generate", "--tokenizer", str(work / "other/tokenizer"), PROMPT, cwd=work),
          "trained with tokenizer", f"but {work / 'other/tokenizer'} is tokenizer", "dvc repro pretrain")
    fails(tinylm("generate", "   ", cwd=work), "the prompt is empty", "Once upon a time")
    fails(tinylm("generate", " ".join(["Once upon a time"] * 10), cwd=work),
          f"at most {BLOCK_SIZE}", f"shorten the prompt to {BLOCK_SIZE - 1} tokens")
    fails(tinylm("generate", "--top-p", "1.5", PROMPT, cwd=work), "--top-p", "(0, 1]")
    fails(tinylm("score", "a text", cwd=Path("/")), "no tinylm repository here", "--model DIR")
    assert sorted(work.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature: temperature must be > 0"),
    (["--top-k", "0"], "--top-k: top_k must be >= 1"),
    (["--min-p", "0"], "--min-p: min_p must be in (0, 1]"),
    (["--strategy", "beam", "--beam-width", "0"], "--beam-width: beam width must be >= 1"),
    (["--length-penalty", "-1"], "--length-penalty: length_penalty must be >= 0"),
    (["--alpha", "1.5"], "--alpha: contrastive alpha must be in [0, 1]"),
    (["--contrastive-k", "0"], "--contrastive-k: contrastive top_k must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens: max_new_tokens must be >= 1"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--strategy", "greedy", "--num-samples", "3"], "deterministic"),
    (["--strategy", "greedy", "--top-k", "5"], "--top-k is a knob of --strategy sample, not greedy"),
    (["--top-k", "5", "--alpha", "0.5"], "pick one with --strategy"),
    (["--low-prob", "2"], "--low-prob must be in [0, 1]"),
])
def test_invalid_knobs_are_refused_before_loading_anything(work, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(work)
    assert main(["generate", *flags, PROMPT]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_argument_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--top-k", "many", PROMPT])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("tinylm generate: error: argument --top-k: invalid int value: 'many' "
                                       "(see `tinylm generate --help`)\n")


# --------------------------------------------------------------------------------------------- score, tokenize


def test_score_perplexity_is_exp_of_the_mean_forward_loss(work, tokenizer):
    text = (work / "story.txt").read_text(encoding="utf-8")
    tokens = [tokenizer.eot_id, *tokenizer.encode(text)]
    assert len(tokens) > 3 * BLOCK_SIZE  # windows must slide
    result = tinylm("score", "story.txt", "--stride", "1", "--top", "3", cwd=work)
    assert result.returncode == 0, result.stderr
    # Independently: each token given the block_size tokens before it (stride 1), one forward per token.
    model = load_model(work / "data/model/model.pt")
    with torch.inference_mode():
        nll = [-model(torch.tensor([tokens[max(0, i - BLOCK_SIZE):i]])).logits[0, -1].log_softmax(-1)[tokens[i]].item()
               for i in range(1, len(tokens))]
    summary = re.search(r"(\d+) tokens: loss ([\d.]+) nats/token, perplexity ([\d.]+), ([\d.]+) bits/byte",
                        result.stdout)
    assert int(summary[1]) == len(nll)
    assert float(summary[3]) == pytest.approx(math.exp(sum(nll) / len(nll)), abs=1e-3)
    assert float(summary[4]) == pytest.approx(sum(nll) / math.log(2) / len(text.encode("utf-8")), abs=1e-4)
    worst = result.stdout.split("most surprising tokens:\n")[1].splitlines()[1]
    assert int(worst.split()[0]) == max(range(len(nll)), key=nll.__getitem__) + 1


def test_a_text_too_long_for_a_file_name_is_scored_as_text(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    text = (work / "story.txt").read_text(encoding="utf-8")[:600]  # > 255 bytes: the OS refuses it as a path
    assert main(["score", "--top", "0", text]) == 0, capsys.readouterr().err
    assert re.fullmatch(r"\d+ tokens: loss [\d.]+ nats/token, perplexity [\d.]+, [\d.]+ bits/byte\n",
                        capsys.readouterr().out)


def test_tokenize_prints_the_ids_of_encode(work, tokenizer):
    texts = ["strawberry", f" {EMOJI_TEXT} is\nhere"]
    result = tinylm("tokenize", *texts, cwd=work / "data")  # the repository root is found from below it
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.split("\n\n")
    for text, block in zip(texts, blocks, strict=True):
        header, _, *rows = block.splitlines()
        ids = tokenizer.encode(text)
        assert header == f"{text!r}: {len(ids)} tokens, {len(text.encode())} bytes"
        assert [int(row.split()[0]) for row in rows] == ids
    assert all(shown in blocks[1] for shown in ("\\xf0", "\\x82", "␣", "\\n"))


# --------------------------------------------------------------------------------------------- --rev


@pytest.mark.slow
def test_rev_loads_the_model_of_a_commit_and_of_a_dvc_experiment(work, tokenizer, tmp_path):
    """main holds model A; the experiment exp-b, saved with `dvc exp save`, model B. Then the DVC cache is
    emptied, so the revisions are read from the remote."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run_cmd(["git", "init", "-q", "-b", "main"], repo)
    for key, value in (("user.name", "t"), ("user.email", "t@t")):
        run_cmd(["git", "config", key, value], repo)
    run_cmd(["dvc", "init", "-q"], repo)
    run_cmd(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "no model yet"], repo)
    run_cmd(["git", "tag", "untrained"], repo)
    shutil.copytree(work / "data", repo / "data")
    run_cmd(["dvc", "add", "-q", "data/model", "data/tokenizer"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "model A"], repo)
    shutil.rmtree(repo / "data/model")
    shutil.copytree(work / "b/model", repo / "data/model")
    run_cmd(["dvc", "add", "-q", "data/model"], repo)
    run_cmd(["dvc", "exp", "save", "-q", "-n", "exp-b"], repo)
    run_cmd(["dvc", "push", "-q", "--all-commits"], repo)

    def files() -> dict[str, int]:
        return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in repo.rglob("*") if ".git" not in p.parts}

    greedy = ["generate", "--strategy", "greedy", "--max-new-tokens", "20"]
    before = files()
    result = tinylm(*greedy, "--rev", "main", "--rev", "exp-b", PROMPT, cwd=repo / "data")
    assert result.returncode == 0, result.stderr
    a, b = (story(work / directory, tokenizer, Greedy()) for directory in ("data/model", "b/model"))
    assert a != b
    assert result.stdout == f"==> rev main <==\n{a}\n==> rev exp-b <==\n{b}"
    assert files() == before  # fetched into a temporary directory, nothing written to the repository

    fails(tinylm(*greedy, "--rev", "untrained", PROMPT, cwd=repo), "revision untrained has no trained model")
    fails(tinylm(*greedy, "--rev", "no-such-rev", PROMPT, cwd=repo), "unknown Git revision 'no-such-rev'")
    # A revision whose tokenizer is not the model's (on a branch: main keeps model A's): the error names that
    # revision's folder, not data/tokenizer.
    run_cmd(["git", "switch", "-q", "-c", "mismatch"], repo)
    shutil.rmtree(repo / "data/tokenizer")
    shutil.copytree(work / "other/tokenizer", repo / "data/tokenizer")
    run_cmd(["dvc", "add", "-q", "data/tokenizer"], repo)
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "another tokenizer"], repo)
    run_cmd(["git", "switch", "-q", "main"], repo)
    fails(tinylm(*greedy, "--rev", "mismatch", PROMPT, cwd=repo), "mismatch:data/model: trained with tokenizer",
          "but mismatch:data/tokenizer is tokenizer")

    shutil.rmtree(repo / ".dvc/cache")
    from_remote = tinylm(*greedy, "--rev", "main", PROMPT, cwd=repo)
    assert from_remote.returncode == 0, from_remote.stderr
    assert from_remote.stdout == a
