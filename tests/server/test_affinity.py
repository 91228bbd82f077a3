"""Prefix-aware routing without a model or a Ray cluster: the routing key a request body gets
(server/affinity.py) and the replica the Ray Serve router picks for it (server/prefix_router.py)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from llamaserve.engine.block_manager import chain_hash, salt_digest
from llamaserve.server import affinity
from llamaserve.server.affinity import (
    chat_messages,
    prefix_digests,
    prompt_text,
    request_digests,
    routing_salt,
)

BOS = 1
BS = 4  # block size for these tests


class FakeTokenizer:
    """One token per character, a BOS when asked; a chat renders as `<role>content` per message."""

    def __init__(self) -> None:
        self.encoded: list[tuple[int, bool]] = []  # (length of the text, add_special_tokens) per call
        self.rendered: list[list[dict[str, str]]] = []

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        self.rendered.append(messages)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded.append((len(text), add_special_tokens))
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]


def expected_digests(tokens: list[int], block_size: int, salt: str) -> list[str]:
    parent = salt_digest(salt)
    out = []
    for i in range(len(tokens) // block_size):
        parent = chain_hash(parent, tuple(tokens[i * block_size:(i + 1) * block_size]))
        out.append(parent.hex())
    return out


# -- chat_messages ---------------------------------------------------------------------------------
def test_chat_messages_of_an_openai_chat_body_are_its_role_content_pairs() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                    {"type": "image_url", "image_url": {}},
                                                                    {"type": "text", "text": "there"}]}]}
    assert chat_messages(body) == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi there"}]


def test_chat_messages_of_an_anthropic_body_put_the_top_level_system_first() -> None:
    body = {"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be "},
                                                      {"type": "text", "text": "brief."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello"}]}
    assert chat_messages(body) == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}]


def test_chat_messages_of_a_responses_body_are_its_instructions_then_its_input_list() -> None:
    body = {"model": "m", "instructions": "Answer in French.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                      {"type": "function_call_output", "call_id": "c1", "output": "18C"}]}  # no role: skipped
    assert chat_messages(body) == [{"role": "system", "content": "Answer in French."},
                                   {"role": "user", "content": "Hello"}]


def test_chat_messages_of_a_completions_body_is_none() -> None:
    assert chat_messages({"model": "m", "prompt": "Once upon a time"}) is None
    assert chat_messages({"model": "m", "input": "a Responses string input"}) is None


# -- prompt_text -----------------------------------------------------------------------------------
def test_prompt_text_of_a_chat_body_is_rendered_through_the_tokenizer() -> None:
    tok = FakeTokenizer()
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    assert prompt_text(body, tok) == "<user>Hi<assistant>"
    assert tok.rendered == [[{"role": "user", "content": "Hi"}]]


def test_prompt_text_of_a_chat_the_template_refuses_is_the_messages_as_json() -> None:
    class Refusing(FakeTokenizer):
        def render_chat(self, messages: list[dict[str, str]]) -> str:
            raise ValueError("roles must alternate")

    body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    assert prompt_text(body, Refusing()) == json.dumps(body["messages"])


def test_prompt_text_of_a_completions_body_is_its_prompt_string_or_first_prompt() -> None:
    tok = FakeTokenizer()
    assert prompt_text({"prompt": "Once upon a time"}, tok) == "Once upon a time"
    assert prompt_text({"prompt": ["first", "second"]}, tok) == "first"
    assert tok.rendered == []  # a completion is never rendered as a chat


def test_prompt_text_is_none_for_a_body_without_a_prompt() -> None:
    tok = FakeTokenizer()
    assert prompt_text({"model": "m"}, tok) is None
    assert prompt_text({"prompt": ""}, tok) is None
    assert prompt_text({"prompt": [1, 2, 3]}, tok) is None  # token ids: not text to route on
    assert prompt_text({"messages": []}, tok) is None


# -- prefix_digests --------------------------------------------------------------------------------
def test_prefix_digests_are_one_per_full_block_only() -> None:
    assert prefix_digests(list(range(BS - 1)), BS, "s") == []
    assert len(prefix_digests(list(range(BS)), BS, "s")) == 1
    assert len(prefix_digests(list(range(3 * BS + BS - 1)), BS, "s")) == 3  # the partial last block: none


def test_prefix_digests_are_capped_at_max_blocks() -> None:
    tokens = list(range((affinity.MAX_BLOCKS + 5) * BS))
    digests = prefix_digests(tokens, BS, "s")
    assert len(digests) == affinity.MAX_BLOCKS
    assert digests == expected_digests(tokens, BS, "s")[:affinity.MAX_BLOCKS]


def test_prefix_digests_chain_like_the_prefix_cache_from_the_salt_digest() -> None:
    tokens = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    first = chain_hash(salt_digest("tenant"), (5, 6, 7, 8))
    second = chain_hash(first, (9, 10, 11, 12))
    assert prefix_digests(tokens, BS, "tenant") == [first.hex(), second.hex()]
    assert prefix_digests(tokens, BS, "other")[0] != first.hex()  # the salt roots the chain


def test_a_shared_prefix_gives_equal_leading_digests_and_then_they_differ() -> None:
    shared = list(range(100, 100 + 2 * BS))
    a = prefix_digests(shared + [1, 2, 3, 4] + [7] * BS, BS, "s")
    b = prefix_digests(shared + [1, 2, 3, 5] + [7] * BS, BS, "s")
    assert len(a) == len(b) == 4
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]  # once they differ, every later digest does too


# -- routing_salt ----------------------------------------------------------------------------------
# The ingress passes dict(request.headers): Starlette's header names, lower-cased.
def test_routing_salt_differs_by_authorization_api_key_and_cache_salt() -> None:
    base = routing_salt({"authorization": "Bearer a"}, {})
    assert routing_salt({"authorization": "Bearer b"}, {}) != base
    assert routing_salt({"authorization": "Bearer a", "x-api-key": "k"}, {}) != base
    assert routing_salt({"x-api-key": "k1"}, {}) != routing_salt({"x-api-key": "k2"}, {})
    assert routing_salt({"authorization": "Bearer a"}, {"cache_salt": "x"}) != base
    assert (routing_salt({"authorization": "Bearer a"}, {"cache_salt": "x"})
            != routing_salt({"authorization": "Bearer a"}, {"cache_salt": "y"}))


def test_routing_salt_is_equal_for_equal_credentials_and_cache_salt() -> None:
    headers = {"authorization": "Bearer a", "x-api-key": "k", "user-agent": "one"}
    salt = routing_salt(headers, {"cache_salt": "x", "prompt": "p"})
    assert routing_salt(headers | {"user-agent": "two"}, {"cache_salt": "x", "prompt": "q"}) == salt
    assert routing_salt({}, {}) == routing_salt({"accept": "*/*"}, {"cache_salt": 7})  # not a str: no salt


# -- request_digests -------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1, 2]", b'"a string"', b"null", b""])
def test_request_digests_are_empty_for_a_body_that_is_not_a_json_object(body: bytes) -> None:
    tok = FakeTokenizer()
    assert request_digests(body, {}, tok, BS) == []
    assert tok.encoded == []


def test_request_digests_are_empty_for_a_body_nested_too_deeply_to_parse() -> None:
    # A hostile body: json.loads raises RecursionError (not a ValueError) on it.
    assert request_digests(b"[" * 100_000, {}, FakeTokenizer(), BS) == []


def test_request_digests_are_empty_for_an_object_without_a_prompt() -> None:
    assert request_digests(json.dumps({"model": "m"}).encode(), {}, FakeTokenizer(), BS) == []


def test_request_digests_of_a_completion_encode_the_prompt_with_special_tokens() -> None:
    tok = FakeTokenizer()
    headers = {"authorization": "Bearer a"}
    body = {"prompt": "abcdefghijk"}
    digests = request_digests(json.dumps(body).encode(), headers, tok, BS)
    tokens = [BOS] + [ord(c) for c in "abcdefghijk"]  # 12 tokens: 3 full blocks
    assert digests == expected_digests(tokens, BS, routing_salt(headers, body))
    assert len(digests) == 3
    assert tok.encoded == [(11, True)]


def test_request_digests_of_a_chat_encode_the_rendered_text_without_special_tokens() -> None:
    tok = FakeTokenizer()
    body = {"messages": [{"role": "user", "content": "Hello there"}]}
    digests = request_digests(json.dumps(body).encode(), {}, tok, BS)
    rendered = "<user>Hello there<assistant>"
    assert digests == expected_digests([ord(c) for c in rendered], BS, routing_salt({}, body))
    assert tok.encoded == [(len(rendered), False)]  # the template carries its own BOS


def test_request_digests_differ_between_tenants_for_the_same_prompt() -> None:
    body = json.dumps({"prompt": "x" * 64}).encode()
    a = request_digests(body, {"authorization": "Bearer a"}, FakeTokenizer(), BS)
    b = request_digests(body, {"authorization": "Bearer b"}, FakeTokenizer(), BS)
    assert len(a) == len(b) == 16
    assert not set(a) & set(b)


def test_max_chars_caps_what_is_tokenized() -> None:
    tok = FakeTokenizer()
    body = json.dumps({"prompt": "y" * (affinity.MAX_CHARS * 4)}).encode()
    digests = request_digests(body, {}, tok, BS)
    assert tok.encoded == [(affinity.MAX_CHARS, True)]
    assert len(digests) == affinity.MAX_BLOCKS


# -- the router ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replica:
    replica_id: str


class QueueLens:
    """Stands in for the router's ReplicaQueueLengthCache: only .get is read."""

    def __init__(self, lens: dict[str, int]) -> None:
        self.lens = lens

    def get(self, replica_id: str) -> int | None:
        return self.lens.get(replica_id)


class Pending:
    def __init__(self, prefix: Any) -> None:
        self.args = [{"prefix": prefix}]


A, B, C = Replica("a"), Replica("b"), Replica("c")


@pytest.fixture
def prefix_router() -> Any:
    pytest.importorskip("ray.serve.request_router")
    from llamaserve.server import prefix_router as module
    return module


def make_router(module: Any, lens: dict[str, int], imbalance: int = 2) -> Any:
    router = module.PrefixAffinityRouter.__new__(module.PrefixAffinityRouter)  # no framework __init__
    router.initialize_state(imbalance=imbalance)
    router._replica_queue_len_cache = QueueLens(lens)
    return router


def choose(router: Any, candidates: list[Replica], pending: Any) -> list[list[Replica]]:
    return asyncio.run(router.choose_replicas(candidates, pending))


def test_initialize_state_keeps_the_imbalance_and_starts_empty(prefix_router: Any) -> None:
    router = make_router(prefix_router, {}, imbalance=7)
    assert router.imbalance == 7
    assert len(router.owner) == 0 and router.routed == {"affinity": 0, "balanced": 0}


def test_a_request_with_no_known_prefix_goes_to_the_shorter_queue(prefix_router: Any) -> None:
    router = make_router(prefix_router, {"a": 0, "b": 3})
    for pending in (Pending(["unknown"]), Pending([]), Pending(None), None):
        assert choose(router, [B, A], pending) == [[A], [B]]
    assert router.routed == {"affinity": 0, "balanced": 4}


def test_balanced_choice_ranks_the_rest_after_the_chosen_one(prefix_router: Any) -> None:
    router = make_router(prefix_router, {"a": 5, "b": 5, "c": 5})
    for _ in range(20):
        ranks = choose(router, [A, B, C], Pending(["unknown"]))
        assert len(ranks) == 2 and len(ranks[0]) == 1
        assert sorted(r.replica_id for r in ranks[0] + ranks[1]) == ["a", "b", "c"]


def test_no_candidates_give_no_ranks(prefix_router: Any) -> None:
    router = make_router(prefix_router, {})
    assert choose(router, [], Pending(["d"])) == []


def test_a_known_prefix_goes_to_its_replica_within_the_imbalance(prefix_router: Any) -> None:
    lens = {"a": 0, "b": 2}
    router = make_router(prefix_router, lens, imbalance=2)
    router.on_request_routed(Pending(["d1", "d2"]), B.replica_id, None)
    assert choose(router, [A, B], Pending(["d1", "d2"])) == [[B], [A]]
    assert choose(router, [A, B], Pending(["d1", "d2", "new"])) == [[B], [A]]  # a leading part is known
    assert choose(router, [A, B], Pending(["d1"])) == [[B], [A]]
    assert router.routed == {"affinity": 3, "balanced": 0}


def test_a_known_prefix_gives_way_when_its_replica_is_too_far_behind(prefix_router: Any) -> None:
    lens = {"a": 0, "b": 3}
    router = make_router(prefix_router, lens, imbalance=2)
    router.on_request_routed(Pending(["d1", "d2"]), B.replica_id, None)
    assert choose(router, [A, B], Pending(["d1", "d2"])) == [[A], [B]]
    assert router.routed == {"affinity": 0, "balanced": 1}
    lens["b"] = 2  # back within the imbalance
    assert choose(router, [A, B], Pending(["d1", "d2"])) == [[B], [A]]
    assert router.routed == {"affinity": 1, "balanced": 1}


def test_the_longest_known_digest_wins(prefix_router: Any) -> None:
    router = make_router(prefix_router, {"a": 1, "b": 1, "c": 0})
    router.on_request_routed(Pending(["p1", "p2", "p3"]), A.replica_id, None)
    router.on_request_routed(Pending(["p1", "p2"]), B.replica_id, None)  # p1, p2 now b's; p3 still a's
    assert choose(router, [A, B, C], Pending(["p1", "p2", "p3", "q"])) == [[A], [B, C]]
    assert choose(router, [A, B, C], Pending(["p1", "p2", "r"])) == [[B], [A, C]]


def test_a_digest_owned_by_a_replica_no_longer_a_candidate_is_ignored(prefix_router: Any) -> None:
    router = make_router(prefix_router, {"a": 0, "b": 1, "c": 0})
    router.on_request_routed(Pending(["p1"]), B.replica_id, None)
    router.on_request_routed(Pending(["p1", "p2"]), C.replica_id, None)
    router.on_request_routed(Pending(["p1"]), B.replica_id, None)  # p1: b, p2: c
    assert choose(router, [A, B], Pending(["p1", "p2"])) == [[B], [A]]  # c is gone: p1's owner, b
    assert choose(router, [A, B], Pending(["p2"])) == [[A], [B]]  # nothing live knows it: balanced
    assert router.routed == {"affinity": 1, "balanced": 1}


def test_on_replica_actor_died_forgets_that_replicas_digests(prefix_router: Any) -> None:
    router = make_router(prefix_router, {"a": 0, "b": 0})
    # What the base RequestRouter.on_replica_actor_died touches (ray 2.60): the replica set and a gauge map.
    router._replicas = {"a": A, "b": B}
    router._replicas_list = [A, B]
    router._replica_id_set = {"a", "b"}
    router._queue_len_gauge_last_update = {"a": 0.0, "b": 0.0}
    router.on_request_routed(Pending(["p1", "p2"]), B.replica_id, None)
    router.on_request_routed(Pending(["q1"]), A.replica_id, None)
    router.on_replica_actor_died(B.replica_id)
    assert dict(router.owner) == {"q1": "a"}
    assert router._replica_id_set == {"a"} and router._replicas == {"a": A}  # the base method ran too
    router._replica_queue_len_cache = QueueLens({"a": 3, "b": 0})
    assert choose(router, [A, B], Pending(["p1", "p2"])) == [[B], [A]]  # balanced now, not a stale match
    assert router.routed == {"affinity": 0, "balanced": 1}


def test_the_owner_map_drops_the_least_recently_routed_digests(prefix_router: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_router, "MAX_ENTRIES", 3)
    router = make_router(prefix_router, {"a": 0, "b": 0})
    router.on_request_routed(Pending(["d1", "d2"]), A.replica_id, None)
    router.on_request_routed(Pending(["d3", "d4"]), B.replica_id, None)
    assert list(router.owner) == ["d2", "d3", "d4"]
    router.on_request_routed(Pending(["d2"]), A.replica_id, None)  # d2 is refreshed...
    router.on_request_routed(Pending(["d5"]), B.replica_id, None)  # ...so d3 is the one to go
    assert list(router.owner) == ["d4", "d2", "d5"]
    assert dict(router.owner) == {"d4": "b", "d2": "a", "d5": "b"}


def test_routing_a_request_again_moves_its_digests_to_the_new_replica(prefix_router: Any) -> None:
    router = make_router(prefix_router, {"a": 0, "b": 0})
    router.on_request_routed(Pending(["d1"]), A.replica_id, None)
    router.on_request_routed(Pending(["d1"]), B.replica_id, None)
    assert dict(router.owner) == {"d1": "b"}
    assert choose(router, [A, B], Pending(["d1"])) == [[B], [A]]


def test_a_request_without_prefix_routed_leaves_nothing_behind(prefix_router: Any) -> None:
    router = make_router(prefix_router, {})
    router.on_request_routed(Pending(None), A.replica_id, None)
    router.on_request_routed(Pending("not a list"), A.replica_id, None)
    assert len(router.owner) == 0


def test_routed_counters_count_affinity_and_balanced_choices(prefix_router: Any) -> None:
    lens = {"a": 0, "b": 0}
    router = make_router(prefix_router, lens, imbalance=1)
    choose(router, [A, B], Pending(["x"]))  # balanced: unknown
    router.on_request_routed(Pending(["x"]), B.replica_id, None)
    choose(router, [A, B], Pending(["x"]))  # affinity
    lens["b"] = 1
    choose(router, [A, B], Pending(["x"]))  # affinity: a gap of 1 is within the imbalance
    lens["b"] = 2
    choose(router, [A, B], Pending(["x"]))  # balanced: a gap of 2 is not
    choose(router, [A, B], None)  # balanced: no request
    assert router.routed == {"affinity": 2, "balanced": 3}
