"""`tinylm serve` as a client sees it: the official `openai` client (and plain HTTP for what no client
would send) against a live server, serving two revisions of a git + DVC repository (tags `one` and `two`,
random tiny models built here). Its texts are checked against `tinylm generate` itself once, and against
`decode`, the library call `tinylm generate` prints (tests/test_cli.py proves the two equal), elsewhere.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from conftest import run_cmd
from serve_helpers import BLOCK_SIZE, TINYLM, Server, make_revisions, make_work
from tinylm.cli.main import main
from tinylm.generation.sampling import Greedy, Sample, Strategy, decode
from tinylm.model import load_model
from tinylm.report.introspection import attention_probabilities
from tinylm.tokenizer.bpe import Tokenizer, load_tokenizer

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_dir) -> Path:
    return make_work(tmp_path_factory.mktemp("serve") / "work", shared_dir)


@pytest.fixture(scope="module")
def server(work, tmp_path_factory):
    repo = make_revisions(work, tmp_path_factory.mktemp("revisions") / "repo")
    server = Server(["--rev", "one", "--rev", "two"], cwd=repo, log_dir=repo.parent)
    yield server
    # Ctrl-C ends it cleanly (130, as a shell reports a command Ctrl-C ended), and nothing it was sent, bad
    # requests included, left a traceback in its log.
    assert server.stop() == 130, server.output()
    assert "Traceback" not in server.output() and "Exception" not in server.output(), server.output()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(work) -> Tokenizer:
    return load_tokenizer(work / "data/tokenizer")


@pytest.fixture(scope="module")
def models(work) -> dict:
    """The served models by id, as the library loads them."""
    return {"one": load_model(work / "data/model/model.pt"), "two": load_model(work / "b/model/model.pt")}


def story(model, tokenizer: Tokenizer, strategy: Strategy, seed: int, max_tokens: int, prompt: str = PROMPT) -> str:
    """The completion `tinylm generate` prints after the prompt, computed by the library."""
    generation, = decode(model, [tokenizer.eot_id, *tokenizer.encode(prompt)], strategy, max_tokens,
                         tokenizer.eot_id, [seed])
    return tokenizer.decode(generation.tokens)


def token_name(data: bytes) -> str:
    """OpenAI's name of a token in logprobs: its text, or its bytes when it holds part of a character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def post(server: Server, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(server: Server, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=60) as response:
        return json.load(response)


# --------------------------------------------------------------------------------------------- the API


def test_models_lists_each_revision(client, server):
    listed = client.models.list().data
    assert [model.id for model in listed] == ["one", "two"]
    assert all(model.owned_by == "tinylm" and model.block_size == BLOCK_SIZE for model in listed)
    assert get(server, "/health") == {"status": "ok", "models": ["one", "two"], "running": 0, "stopped_early": 0}


def test_completions_equal_tinylm_generate_and_each_revision_is_its_model(client, work, tokenizer, models):
    knobs = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9"]
    printed = run_cmd([str(TINYLM), "generate", "--model", str(work / "data/model"), *knobs, "--seed", "3",
                       "--num-samples", "2", "--max-new-tokens", "40", PROMPT], work)
    stories = [part.split(" ---\n", 1)[1] for part in printed.split("--- sample ")[1:]]
    completion = client.completions.create(model="one", prompt=PROMPT, max_tokens=40, temperature=0.8, top_p=0.9,
                                           seed=3, n=2, extra_body={"top_k": 40})
    assert [PROMPT + choice.text + "\n" for choice in completion.choices] == stories
    assert stories[0] != stories[1]
    assert completion.usage.prompt_tokens == 1 + len(tokenizer.encode(PROMPT))  # <|endoftext|> starts a story

    # The other revision, greedy (temperature 0) and min_p: each its own library call.
    for model_id, temperature, min_p, strategy in (("two", 1.0, None, Sample()), ("one", 0.0, None, Greedy()),
                                                   ("two", 1.2, 0.05, Sample(temperature=1.2, min_p=0.05))):
        extra = {} if min_p is None else {"min_p": min_p}
        text = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30, temperature=temperature,
                                         seed=5, extra_body=extra).choices[0].text
        assert text == story(models[model_id], tokenizer, strategy, 5, 30)


def test_streamed_chunks_concatenate_to_the_completion(client, server):
    settings = dict(model="two", prompt=PROMPT, max_tokens=40, seed=7, n=2)
    whole = client.completions.create(**settings)
    chunks = list(client.completions.create(**settings, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = finishes[choice.index] or choice.finish_reason
    assert texts == [choice.text for choice in whole.choices]
    assert finishes == [choice.finish_reason for choice in whole.choices]
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 2  # as decoded, not in one lump
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_sequences_cut_the_text_before_them(client):
    settings = dict(model="one", prompt=PROMPT, max_tokens=40, seed=2)
    full = client.completions.create(**settings).choices[0].text
    stop = full[12:15]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(**settings, stop=[stop, "never there"], stream=True))
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = client.completions.create(**settings, stop=[stop, "never there"]).choices[0]
            text, finish = choice.text, choice.finish_reason
        assert (text, finish) == (cut, "stop")


def test_echo_and_logprobs_are_the_models_own(client, models, tokenizer):
    choice = client.completions.create(model="one", prompt=PROMPT, max_tokens=12, seed=1, echo=True, logprobs=3,
                                       stop="never there").choices[0]
    prompt = [tokenizer.eot_id, *tokenizer.encode(PROMPT)]
    generation, = decode(models["one"], prompt, Sample(), 12, tokenizer.eot_id, [1])
    assert choice.text == PROMPT + tokenizer.decode(generation.tokens)
    listed = prompt[1:] + generation.tokens  # with echo, the prompt's tokens too (not the <|endoftext|> before it)
    logprobs = choice.logprobs
    assert logprobs.tokens == [token_name(tokenizer.decode_bytes([token])) for token in listed]
    assert logprobs.text_offset == [len(tokenizer.decode(listed[:i])) for i in range(len(listed))]
    with torch.inference_mode():
        expected = models["one"](torch.tensor([prompt + generation.tokens])).logits[0].log_softmax(-1)
    for i, token in enumerate(listed):
        assert logprobs.token_logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-4)
        assert list(logprobs.top_logprobs[i].values()) == pytest.approx(expected[i].topk(3).values.tolist(), abs=1e-4)


# --------------------------------------------------------------------------------------------- bad input


OVERSIZED = json.dumps({"prompt": "x" * (2 << 20)}).encode()


@pytest.mark.parametrize("body, status, param, message", [
    ({"prompt": PROMPT, "temperature": -0.5}, 400, "temperature", "temperature must be >= 0"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": PROMPT, "top_k": 0}, 400, "top_k", "top_k must be >= 1"),
    ({"prompt": PROMPT, "max_tokens": BLOCK_SIZE}, 400, "max_tokens", f"context is {BLOCK_SIZE} tokens"),
    ({"prompt": PROMPT * 200}, 400, "prompt", "shorten the prompt"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": PROMPT, "model": "three"}, 400, "model", "model 'three' is not served here; served: one, two"),
    ({"prompt": PROMPT, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": 7}, 400, "prompt", "valid string"),
    ({"prompt": PROMPT, "stop": [""]}, 400, "stop", "non-empty"),
    ({"prompt": PROMPT, "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"prompt": PROMPT, "logprobs": 2, "stream": True}, 400, "logprobs", "stream false only"),
    (b'{"prompt": "Once upon', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "valid dictionary"),
    (OVERSIZED, 413, None, "over 1048576 bytes"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param, message):
    code, error = post(server, "/v1/completions", body)
    assert code == status
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param and message in error["error"]["message"], error
    assert get(server, "/health")["status"] == "ok"


def test_bad_requests_beyond_completions(server, client):
    assert post(server, "/v1/attention", {"text": "Hi", "layer": 2})[1]["error"]["message"] == \
        "layer 2 does not exist: the model has 2 (0..1)"
    with pytest.raises(openai.NotFoundError, match="no GET /v1/nowhere here"):
        client.get("/nowhere", cast_to=object)
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        client.completions.create(model="one", prompt=PROMPT, top_p=2)
    # An oversized body sent in chunks, with no Content-Length to refuse it by.
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/score", body=iter([OVERSIZED[i:i + 65536] for i in range(0, len(OVERSIZED), 65536)]),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "over 1048576 bytes" in json.load(response)["error"]["message"]
    connection.close()


def test_command_line_errors_are_one_line(work, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(work / "data/model"), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"tinylm serve: error: cannot listen on 127.0.0.1:{port}") and error.count("\n") == 1
    assert main(["serve", "--model", str(work / "data/model"), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the playground's endpoints


def test_score_gives_each_tokens_loss_and_the_alternatives(server, models, tokenizer):
    text = "Once upon a time, there was a little girl named Lily. She liked to play."
    code, scored = post(server, "/v1/score", {"model": "two", "text": text, "top": 4})
    assert code == 200
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    assert [token["id"] for token in scored["tokens"]] == ids[1:]
    with torch.inference_mode():
        expected = models["two"](torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    nll = [-expected[i, token].item() for i, token in enumerate(ids[1:])]
    assert [token["nll"] for token in scored["tokens"]] == pytest.approx(nll, abs=1e-4)
    assert scored["loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert scored["ppl"] == pytest.approx(math.exp(scored["loss"]), rel=1e-6)
    assert scored["bpb"] == pytest.approx(sum(nll) / math.log(2) / len(text.encode()), abs=1e-5)
    for i, token in enumerate(scored["tokens"]):
        top = expected[i].topk(4)
        assert [a["id"] for a in token["alternatives"]] == top.indices.tolist()
        assert [a["logprob"] for a in token["alternatives"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_attention_is_the_reports_probabilities(server, models, tokenizer):
    text = "Tom and Sue went to the park."
    code, view = post(server, "/v1/attention", {"model": "one", "text": text, "layer": 1, "head": 1})
    assert code == 200
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    assert view["tokens"] == [tokenizer.decode([i]) for i in ids] and not view["truncated"]
    probs = attention_probabilities(models["one"], torch.tensor(ids))[1, 1]
    for query, row in enumerate(view["weights"]):
        assert len(row) == query + 1 and sum(row) == pytest.approx(1, abs=1e-4)
        assert row == pytest.approx(probs[query, :query + 1].tolist(), abs=1e-5)


# --------------------------------------------------------------------------------------------- concurrency


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, models, tokenizer):
    ids = [tokenizer.eot_id, *tokenizer.encode(PROMPT)]
    generation, = decode(models["one"], ids, Greedy(), BLOCK_SIZE - len(ids), tokenizer.eot_id)
    assert not generation.stopped_at_eot  # the case under test: left alone, it would run to max_tokens
    before = get(server, "/health")["stopped_early"]
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"model": "one", "prompt": PROMPT, "temperature": 0, "stream": True,
                                        "max_tokens": BLOCK_SIZE - len(ids)}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()  # and the socket with it: the client is gone
    deadline = time.monotonic() + 30
    while (health := get(server, "/health"))["running"] or health["stopped_early"] == before:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    assert health["stopped_early"] == before + 1


def test_32_concurrent_streams_each_equal_their_seed_and_memory_returns_to_idle(server, models, tokenizer):
    """Each stream equals its seed's story decoded alone. Memory: the first burst warms the server (every
    decoding thread started, torch's allocations made); after it, RSS idles at a level the next bursts
    must come back to, within RSS_SLACK_KIB."""
    seeds = range(32)
    expected = [story(models["two"], tokenizer, Sample(temperature=0.9), seed, 60) for seed in seeds]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(seed: int) -> str:
        stream = await client.completions.create(model="two", prompt=PROMPT, max_tokens=60, temperature=0.9,
                                                 seed=seed, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def burst() -> list[str]:
        return await asyncio.gather(*map(one, seeds))

    async def bursts() -> list[tuple[list[str], int]]:
        results = []
        for _ in range(3):
            texts = await burst()
            await asyncio.sleep(0.5)  # let the last responses' buffers go
            results.append((texts, server.rss_kib()))
        await client.close()
        return results

    results = asyncio.run(bursts())
    assert all(texts == expected for texts, _ in results)
    idle = results[0][1]
    assert [rss - idle for _, rss in results[1:]] == pytest.approx([0, 0], abs=RSS_SLACK_KIB), results
    assert get(server, "/health")["running"] == 0


# Allocator noise: glibc keeps freed chunks in per-thread arenas and trims them lazily. Measured here
# after the warm-up burst, each burst moved RSS by under 0.5 MiB (320,980 -> 321,424 -> 321,436 KiB),
# while a leak of one KV cache per request (32 x 2 layers x keys and values x 512 positions x 16 floats)
# would add 8 MiB per burst.
RSS_SLACK_KIB = 4096
