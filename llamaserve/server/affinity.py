"""What a prefix-aware router needs from a request, without Ray: the digests of its prompt's first blocks.

The ingress tokenizes the prompt as the replica will (the chat template for chat-shaped bodies) and
chains the digests as the prefix cache does (`block_manager.chain_hash`), rooted in a salt made from the
request's credentials and `cache_salt`: two requests share a routing key only where they could share
cached blocks. The digests need not equal a replica's own (its salt is the key's position); they only
have to agree between requests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llamaserve.engine.block_manager import chain_hash, salt_digest

MAX_BLOCKS = 64  # routing looks at most this many leading blocks (1,024 tokens at block size 16)
MAX_CHARS = 32 * 1024  # and tokenizes at most this much of the prompt's text


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts (OpenAI, Anthropic): their text, in order
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)
                       and isinstance(p.get("text", ""), str))
    return ""


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation in a chat-shaped body (OpenAI chat, Anthropic Messages, Ollama chat, Responses),
    as plain role/content pairs; None for other bodies."""
    messages: list[dict[str, str]] = []
    system = body.get("system") if "system" in body else body.get("instructions")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    raw = body.get("messages")
    if raw is None and isinstance(body.get("input"), list):
        raw = body["input"]
    if not isinstance(raw, list):
        return None
    for m in raw:
        if isinstance(m, dict) and isinstance(m.get("role"), str):
            messages.append({"role": m["role"], "content": _text(m.get("content"))})
    return messages


def prompt_text(body: dict[str, Any], tokenizer: Any) -> str | None:
    """The text a replica would run first for this body, as far as routing needs it; None if unknown."""
    messages = chat_messages(body)
    if messages:
        try:
            return str(tokenizer.render_chat(messages))
        except ValueError:  # a conversation the template refuses: the replica will say so
            return json.dumps(messages)
    for field in ("prompt", "input"):  # completions, Ollama generate, Responses with a string input
        value = body.get(field)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
    return None


def routing_salt(headers: dict[str, str], body: dict[str, Any]) -> str:
    """Requests under different credentials (or cache salts) never share a routing key."""
    who = headers.get("authorization", "") + "\n" + headers.get("x-api-key", "")
    salt = body.get("cache_salt")
    return hashlib.blake2b(f"{who}\n{salt if isinstance(salt, str) else ''}".encode(),
                           digest_size=16).hexdigest()


def prefix_digests(tokens: list[int], block_size: int, salt: str) -> list[str]:
    """Hex digests of the full leading blocks, first block first (at most MAX_BLOCKS)."""
    parent = salt_digest(salt)
    out = []
    for i in range(min(len(tokens) // block_size, MAX_BLOCKS)):
        parent = chain_hash(parent, tuple(tokens[i * block_size:(i + 1) * block_size]))
        out.append(parent.hex())
    return out


def request_digests(body: bytes, headers: dict[str, str], tokenizer: Any, block_size: int) -> list[str]:
    """The routing key of an HTTP request body: [] when it has no prompt (GET, a bad body, a list)."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth: no key
        return []
    if not isinstance(data, dict):
        return []
    text = prompt_text(data, tokenizer)
    if not text:
        return []
    tokens = tokenizer.encode(text[:MAX_CHARS], add_special_tokens=not chat_messages(data))
    return prefix_digests(tokens, block_size, routing_salt(headers, data))
