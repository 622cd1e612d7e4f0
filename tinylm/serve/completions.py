"""POST /v1/completions: OpenAI's text completions on the project's decoding.

A request becomes one `Job` per choice (each prompt, n times: choice i of a prompt is drawn with
seed + i, as `tinylm generate --num-samples` draws its samples), each decoded alone by
`tinylm.generation.sampling.decode`, so a choice's text is exactly `tinylm generate`'s story for
the same prompt, seed and knobs. The prompt follows <|endoftext|>, as every story does in
training. temperature 0 decodes greedily (OpenAI's convention; `tinylm generate --strategy
greedy`). A choice ends at <|endoftext|> or a stop sequence (finish_reason "stop") or after
max_tokens ("length"); prompt and max_tokens must fit in the model's context together.

Streamed, each choice's text goes out as server-sent events as it is decoded, the choices
interleaved, then `data: [DONE]`. logprobs (non-streamed) are the model's own at temperature 1
before any filtering, as `tinylm score` computes them, with the `logprobs` most likely tokens at
each position; with echo, the prompt's tokens are listed too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from tinylm.cli.models import Loaded
from tinylm.generation.sampling import Greedy, Sample, Strategy
from tinylm.serve.analysis import alternatives, token_losses
from tinylm.serve.schemas import APIError, CompletionRequest
from tinylm.serve.text import TextStream
from tinylm.serve.workers import Job, Workers

log = logging.getLogger("tinylm.serve")


def strategy_of(request: CompletionRequest) -> Strategy:
    """The request's knobs as a strategy, each refused by the check `tinylm generate` refuses it with."""
    if request.temperature < 0:
        raise APIError(400, f"temperature must be >= 0 (0 decodes greedily), got {request.temperature}",
                       param="temperature")
    knobs = {name: getattr(request, name) for name in ("top_k", "top_p", "min_p") if getattr(request, name) is not None}
    for name, value in knobs.items():
        try:
            Sample(**{name: value})
        except ValueError as exc:
            raise APIError(400, str(exc), param=name) from None
    # The truncations always keep the most likely token, so greedy decoding is the same with or without them.
    return Greedy() if request.temperature == 0 else Sample(temperature=request.temperature, **knobs)


def prompt_ids(loaded: Loaded, prompt: str, max_tokens: int) -> list[int]:
    ids = [loaded.tokenizer.eot_id, *loaded.tokenizer.encode(prompt)]
    context = loaded.model.config.block_size
    if len(ids) >= context:
        raise APIError(400, f"the prompt is {len(ids)} tokens with the <|endoftext|> that starts a story, but this "
                            f"model's context is {context}: shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    if len(ids) + max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens: the prompt takes {len(ids)} (with the "
                            f"<|endoftext|> that starts a story), and max_tokens {max_tokens} would need "
                            f"{len(ids) + max_tokens}; ask for at most {context - len(ids)}", param="max_tokens",
                       code="context_length_exceeded")
    return ids


@dataclass
class Choice:
    index: int
    prompt: str
    job: Job
    text: str = ""  # what the client was sent, the echoed prompt not included
    tokens: list[int] = field(default_factory=list)  # every token decoded, a final <|endoftext|> included
    finish_reason: str | None = None


def plan(request: CompletionRequest, loaded: Loaded) -> list[Choice]:
    strategy = strategy_of(request)
    choices = []
    for prompt in request.prompts():
        ids = prompt_ids(loaded, prompt, request.max_tokens)
        for sample in range(request.n):
            job = Job(loaded, ids, strategy, request.max_tokens, request.seed + sample)
            choices.append(Choice(len(choices), prompt, job))
    return choices


async def deltas(workers: Workers, choice: Choice, stops: list[str]) -> AsyncIterator[str]:
    """The choice's text as it is decoded; fills in its text, tokens and finish_reason."""
    tokenizer = choice.job.loaded.tokenizer
    text = TextStream(tokenizer, stops)
    ended = False
    async with aclosing(workers.tokens(choice.job)) as batches:
        async for batch in batches:
            released = ""
            for token in batch:
                choice.tokens.append(token)
                ended = token == tokenizer.eot_id
                if ended:
                    break
                released += text.push(token)
                if text.stopped:
                    break
            if released:
                choice.text += released
                yield released
            if ended or text.stopped:
                break
    choice.finish_reason = "stop" if ended or text.stopped else "length"
    if rest := text.finish():
        choice.text += rest
        yield rest


def token_name(loaded: Loaded, token: int) -> str:
    """A token in logprobs: its text, or as OpenAI names a token that holds part of a character, its bytes
    ("bytes:\\xe2\\x80"), so that no two tokens of top_logprobs share a name."""
    data = loaded.tokenizer.decode_bytes([token])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def logprobs_of(choice: Choice, echo: bool, top: int) -> dict:
    """OpenAI's logprobs object for a finished choice: its tokens (and the prompt's, with echo)."""
    loaded, ids = choice.job.loaded, choice.job.ids
    tokens = ids + choice.tokens
    nll = token_losses(loaded, tokens)  # target i is tokens[i + 1]
    expected = alternatives(loaded, tokens, top) if top else None
    first = 1 if echo else len(ids)
    listed = tokens[first:]
    return {
        "tokens": [token_name(loaded, token) for token in listed],
        "token_logprobs": [-float(nll[i - 1]) for i in range(first, len(tokens))],
        "top_logprobs": None if expected is None else [{token_name(loaded, t): lp for t, lp in expected[i - 1]}
                                                       for i in range(first, len(tokens))],
        "text_offset": [len(loaded.tokenizer.decode(listed[:k])) for k in range(len(listed))],
    }


def usage(choices: list[Choice]) -> dict:
    prompt_tokens = sum(len(ids) for ids in {c.prompt: c.job.ids for c in choices}.values())
    completion_tokens = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def header(model_id: str) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id}


async def complete(request: CompletionRequest, model_id: str, loaded: Loaded, workers: Workers) -> dict:
    """The whole completion, once every choice is done (stream false)."""
    stops, choices = request.stops(), plan(request, loaded)

    async def run(choice: Choice) -> list[str]:
        # deltas() also accumulates choice.text and its finish reason: the whole text is read from the choice.
        return [delta async for delta in deltas(workers, choice, stops)]

    await asyncio.gather(*map(run, choices))
    rows = []
    for choice in choices:
        logprobs = None
        if request.logprobs is not None:
            logprobs = await workers.call(logprobs_of, choice, request.echo, request.logprobs)
        rows.append({"index": choice.index, "text": choice.prompt * request.echo + choice.text,
                     "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return {**header(model_id), "choices": rows, "usage": usage(choices)}


def plan_stream(request: CompletionRequest, model_id: str, loaded: Loaded, workers: Workers) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion; the request is refused here, before any is sent."""
    if request.logprobs is not None:
        raise APIError(400, "logprobs are given with stream false only: drop one of them", param="logprobs")
    return _events(request, header(model_id), request.stops(), plan(request, loaded), workers)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(request: CompletionRequest, head: dict, stops: list[str], choices: list[Choice],
                  workers: Workers) -> AsyncIterator[str]:
    def chunk(choice: Choice, text: str, finish_reason: str | None = None) -> str:
        return _event({**head, "choices": [{"index": choice.index, "text": text, "logprobs": None,
                                            "finish_reason": finish_reason}]})

    events: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for text in deltas(workers, choice, stops):
                events.put_nowait(chunk(choice, text))
            events.put_nowait(chunk(choice, "", choice.finish_reason))
        except Exception as exc:  # a bug, not the client's doing: say so in the stream, keep serving
            log.exception("choice %d of %s failed", choice.index, head["id"])
            events.put_nowait(_event(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                              kind="server_error").body()))
        finally:
            events.put_nowait(None)  # this choice is done

    if request.echo:
        for choice in choices:
            yield chunk(choice, choice.prompt)
    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        for _ in tasks:
            while (event := await events.get()) is not None:
                yield event
        if request.stream_options is not None and request.stream_options.include_usage:
            yield _event({**head, "choices": [], "usage": usage(choices)})
        yield "data: [DONE]\n\n"
    finally:
        # The client went away (the response is cancelled) or all is sent: stop what still decodes.
        for task in tasks:
            task.cancel()
