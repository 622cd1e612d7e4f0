"""What tests/test_serve.py and tests/test_playground.py share: tiny models in a folder the command takes
for a repository, the same models as two revisions of a git + DVC repository, and a live `tinylm serve`."""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import run_cmd, save_untrained_model
from tinylm.corpus.formats import iter_eot_stories, write_eot_stories
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer.bpe import EOT, Tokenizer, load_tokenizer
from tinylm.tokenizer.train import train_bpe

TINYLM = Path(sys.executable).parent / "tinylm"
# Long enough for a generation that outlasts a client (test_serve's disconnect test), small enough to be fast.
BLOCK_SIZE = 512
LISTENING = re.compile(r"at (http://\S+)/v1 ")


def random_model(vocab_size: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK_SIZE, n_layer=2, n_head=2, d_model=16))


def make_work(root: Path, shared_dir: Path) -> Path:
    """root/data/tokenizer (300 tokens, trained on 150 shared stories), root/data/model (seed 1) and
    root/b/model (seed 2), in a folder the command takes for the repository root (it holds a .dvc/)."""
    (root / ".dvc").mkdir(parents=True)
    stories = itertools.islice(iter_eot_stories(shared_dir / "data/tinystories/TinyStories-valid-sample.txt"), 150)
    write_eot_stories(root / "train.txt", list(stories))
    Tokenizer(*train_bpe(root / "train.txt", 300, [EOT]), [EOT]).save(root / "data/tokenizer")
    tokenizer = load_tokenizer(root / "data/tokenizer")
    save_untrained_model(random_model(tokenizer.vocab_size, seed=1), tokenizer, (root / "data/model"))
    save_untrained_model(random_model(tokenizer.vocab_size, seed=2), tokenizer, (root / "b/model"))
    return root


def make_revisions(work: Path, repo: Path) -> Path:
    """A git + DVC repository whose tag `one` holds work's data/model and tag `two` its b/model."""
    repo.mkdir()
    for args in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"],
                 ["dvc", "init", "-q"]):
        run_cmd(args, repo)
    shutil.copytree(work / "data", repo / "data")
    run_cmd(["dvc", "add", "-q", "data/model", "data/tokenizer"], repo)
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "model one"], ["git", "tag", "one"]):
        run_cmd(args, repo)
    shutil.rmtree(repo / "data/model")
    shutil.copytree(work / "b/model", repo / "data/model")
    run_cmd(["dvc", "add", "-q", "data/model"], repo)
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "model two"], ["git", "tag", "two"]):
        run_cmd(args, repo)
    return repo


class Server:
    """`tinylm serve --port 0 ARGS` in cwd, its log in log_dir; `url` once it listens."""

    def __init__(self, args: list[str], cwd: Path, log_dir: Path, timeout: float = 120):
        self.log = log_dir / "serve.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(TINYLM), "serve", "--port", "0", *args], cwd=cwd, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while not (found := LISTENING.search(self.output())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tinylm serve did not start:\n{self.output()}")
            time.sleep(0.1)
        self.url = found[1]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])

    def stop(self) -> int:
        """Ctrl-C, as a person stops it; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
