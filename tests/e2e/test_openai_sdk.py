"""The server through the official openai SDK (sync and async): results, streams, usage, error types."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.e2e.conftest import MODEL, Live

MESSAGES = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


@dataclass
class Streamed:
    """A stream's pieces: text per choice, token chunks, finish reasons, the usage chunk."""

    text: dict[int, str] = field(default_factory=dict)
    token_chunks: int = 0
    finish: dict[int, str | None] = field(default_factory=dict)
    usage: Any = None


async def _chat_stream(client: AsyncOpenAI, **kw: Any) -> Streamed:
    out = Streamed()
    async for chunk in await client.chat.completions.create(model=MODEL, stream=True, **kw):
        if chunk.usage is not None:
            out.usage = chunk.usage
        for c in chunk.choices:
            out.text[c.index] = out.text.get(c.index, "") + (c.delta.content or "")
            if c.delta.role is None:  # every chunk after the role chunk carries one sampled token
                out.token_chunks += 1
            if c.finish_reason is not None:
                out.finish[c.index] = c.finish_reason
    return out


async def _completion_stream(client: AsyncOpenAI, **kw: Any) -> Streamed:
    out = Streamed()
    async for chunk in await client.completions.create(model=MODEL, stream=True, **kw):
        if chunk.usage is not None:
            out.usage = chunk.usage
        for c in chunk.choices:
            out.text[c.index] = out.text.get(c.index, "") + c.text
            out.token_chunks += 1
            if c.finish_reason is not None:
                out.finish[c.index] = c.finish_reason
    return out


@pytest.fixture(scope="module")
def sync_client(server: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def runs(server: Live) -> dict[str, Any]:
    """Every generating request of this module at once, so the engine batches them (CPU time is short)."""
    greedy_chat = {"messages": MESSAGES, "temperature": 0, "max_tokens": 8,
                   "extra_body": {"ignore_eos": True}}
    greedy_completion = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8}

    async def main() -> dict[str, Any]:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0,
                               timeout=120) as c:
            chat, completion = c.chat.completions.create, c.completions.create
            seeded = {"messages": MESSAGES, "temperature": 0.8, "seed": 1234, "max_tokens": 8}
            jobs: dict[str, Awaitable[Any]] = {
                "chat": chat(model=MODEL, **greedy_chat),
                "chat_stream": _chat_stream(c, stream_options={"include_usage": True}, **greedy_chat),
                "completion": completion(model=MODEL, **greedy_completion),
                "completion_stream": _completion_stream(c, stream_options={"include_usage": True},
                                                        **greedy_completion),
                "n2": chat(model=MODEL, messages=MESSAGES, n=2, temperature=1.0, max_tokens=6),
                "n2_stream": _chat_stream(c, messages=MESSAGES, n=2, max_tokens=4, stream_options={
                    "include_usage": True}, extra_body={"ignore_eos": True}),
                "prompts_n2_stream": _completion_stream(c, prompt=["Red", "Blue"], n=2, max_tokens=3,
                                                        stream_options={"include_usage": True},
                                                        extra_body={"ignore_eos": True}),
                "echo": completion(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True),
                "seed_a": chat(model=MODEL, **seeded),
                "seed_b": chat(model=MODEL, **seeded),
                "chat_logprobs": chat(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4,
                                      logprobs=True, top_logprobs=3),
                "completion_logprobs": completion(model=MODEL, prompt=PROMPT, temperature=0.5, max_tokens=4,
                                                  logprobs=2),
                "extras": chat(model=MODEL, messages=MESSAGES, temperature=0.7, top_p=0.9,
                               max_completion_tokens=6, presence_penalty=0.5, frequency_penalty=0.5,
                               logit_bias={"28": -100}, user="u1", stop=["\n\n\n", "zzz"],
                               extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                           "min_tokens": 4}),
            }
            results = await asyncio.gather(*jobs.values(), return_exceptions=True)
            return dict(zip(jobs, results, strict=True))

    return asyncio.run(main())


def result(runs: dict[str, Any], name: str) -> Any:
    value = runs[name]
    if isinstance(value, BaseException):
        raise value
    return value


def test_chat_and_its_stream_agree(runs: dict[str, Any], server: Live) -> None:
    chat, stream = result(runs, "chat"), result(runs, "chat_stream")
    assert chat.object == "chat.completion" and chat.model == MODEL
    assert chat.choices[0].message.role == "assistant"
    assert stream.text[0] == chat.choices[0].message.content  # temperature 0: the same tokens
    # ignore_eos + max_tokens 8: exactly 8 tokens, each in its own chunk, and usage says so
    assert chat.usage.completion_tokens == stream.usage.completion_tokens == stream.token_chunks == 8
    assert chat.choices[0].finish_reason == stream.finish[0] == "length"
    with httpx.Client(base_url=server.url, headers=server.headers) as c:
        rendered = c.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert chat.usage.prompt_tokens == stream.usage.prompt_tokens == rendered
    assert chat.usage.total_tokens == rendered + 8


def test_completion_and_its_stream_agree(runs: dict[str, Any]) -> None:
    completion, stream = result(runs, "completion"), result(runs, "completion_stream")
    assert completion.object == "text_completion"
    assert stream.text[0] == completion.choices[0].text
    assert completion.usage.completion_tokens == stream.usage.completion_tokens == stream.token_chunks
    assert completion.usage.prompt_tokens == stream.usage.prompt_tokens > 0
    assert completion.choices[0].finish_reason == stream.finish[0] in ("stop", "length")


def test_n2(runs: dict[str, Any]) -> None:
    n2 = result(runs, "n2")
    assert [c.index for c in n2.choices] == [0, 1]
    assert all(c.message.content for c in n2.choices)
    assert n2.usage.completion_tokens <= 12


def test_n2_stream(runs: dict[str, Any]) -> None:
    stream = result(runs, "n2_stream")
    assert sorted(stream.text) == [0, 1] and stream.finish == {0: "length", 1: "length"}
    assert stream.usage.completion_tokens == stream.token_chunks == 8


def test_prompt_list_with_n2_stream(runs: dict[str, Any]) -> None:
    stream = result(runs, "prompts_n2_stream")  # choice index = prompt index * n + sample index
    assert sorted(stream.text) == [0, 1, 2, 3] and set(stream.finish.values()) == {"length"}
    assert stream.usage.completion_tokens == stream.token_chunks == 12


def test_echo(runs: dict[str, Any]) -> None:
    echo = result(runs, "echo")
    assert echo.choices[0].text.startswith(PROMPT) and len(echo.choices[0].text) > len(PROMPT)


def test_seed_reproducible(runs: dict[str, Any]) -> None:
    a, b = result(runs, "seed_a"), result(runs, "seed_b")
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_logprobs(runs: dict[str, Any]) -> None:
    chat = result(runs, "chat_logprobs")
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_completion_logprobs(runs: dict[str, Any]) -> None:
    lp = result(runs, "completion_logprobs").choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(x <= 0 for x in lp.token_logprobs)
    for top in lp.top_logprobs:
        assert 1 <= len(top) <= 2 and all(v <= 0 for v in top.values())  # two ids may decode alike


def test_sampling_extras(runs: dict[str, Any]) -> None:
    extras = result(runs, "extras")
    assert 4 <= extras.usage.completion_tokens <= 6  # min_tokens and max_completion_tokens hold


def test_stop_string(runs: dict[str, Any], sync_client: OpenAI) -> None:
    text = result(runs, "chat").choices[0].message.content
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    r = sync_client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=8,
                                            stop=stop)
    content = r.choices[0].message.content
    assert stop not in content and text.startswith(content)
    assert r.choices[0].finish_reason == "stop"
    c = sync_client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8,
                                       stop=[result(runs, "completion").choices[0].text.split()[0]])
    assert c.choices[0].finish_reason == "stop" and c.choices[0].text.strip() == ""


def test_models(sync_client: OpenAI) -> None:
    assert [m.id for m in sync_client.models.list()] == [MODEL]
    assert sync_client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sync_client.models.retrieve("nope")


def test_bad_requests(sync_client: OpenAI) -> None:
    chat = sync_client.chat.completions.create
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(model=MODEL, messages=MESSAGES, temperature=3.0, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="top_k"):
        chat(model=MODEL, messages=MESSAGES, max_tokens=1, extra_body={"top_k": -3})
    with pytest.raises(openai.BadRequestError):
        chat(model=MODEL, messages=[{"role": "wizard", "content": "hi"}], max_tokens=1)  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="n: Input should be greater than or equal to 1"):
        chat(model=MODEL, messages=MESSAGES, n=0, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="999999"):
        chat(model=MODEL, messages=MESSAGES, max_tokens=1, logit_bias={"999999": 1})
    with pytest.raises(openai.BadRequestError):
        sync_client.completions.create(model=MODEL, prompt="hi", max_tokens=1, logprobs=99)


def test_prompt_too_long(server: Live, sync_client: OpenAI) -> None:
    messages = [{"role": "user", "content": "hello " * 9000}]
    with httpx.Client(base_url=server.url, headers=server.headers) as c:
        n = c.post("/tokenize", json={"messages": messages}).json()["count"]
    with pytest.raises(openai.BadRequestError) as e:
        sync_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)  # type: ignore[arg-type]
    message = str(e.value)
    assert f"prompt has {n} tokens" in message and "max_tokens is 7" in message and "8192" in message
    assert e.value.status_code == 400


def test_wrong_key(server: Live) -> None:
    with OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]


def test_unknown_model(sync_client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="nope"):
        sync_client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        sync_client.completions.create(model="nope", prompt="hi", max_tokens=1)


def test_oversized_body(server: Live, sync_client: OpenAI) -> None:
    limit = server.app.state.llamaserve.settings.max_body_bytes
    with pytest.raises(openai.APIStatusError) as e:
        sync_client.chat.completions.create(model=MODEL, max_tokens=1,
                                            messages=[{"role": "user", "content": "x" * limit}])
    assert e.value.status_code == 413


def test_full_queue_is_rate_limited(queue_server: Live) -> None:
    async def main() -> list[Any]:
        async with AsyncOpenAI(base_url=f"{queue_server.url}/v1", api_key=queue_server.key, max_retries=0,
                               timeout=120) as c:
            jobs = [c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True}) for _ in range(8)]
            return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = asyncio.run(main())
    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert limited and done and len(limited) + len(done) == len(outcomes), outcomes
    assert all(int(e.response.headers["retry-after"]) >= 1 for e in limited)
    assert all(o.usage.completion_tokens == 8 for o in done)
