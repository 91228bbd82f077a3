"""Golden parity: the embedded SmolLM2 GGUF through our model vs transformers on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from llamaserve.loader.weights import load_model
from tests.checkpoints import rel_err
from tests.paged import forward_logits, greedy, new_seqs, step

TEXTS = [
    "The capital of France is",
    "Hello",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🦙🚀, Ελληνικά.",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987,",
    "the the the the the the the the the the the the the the the the",
    "   Leading spaces,\ttabs,\n\nand blank lines\r\n end here.   ",
    " ".join(
        f"Paragraph {i}: llamas live in the Andes, eat grass, and carry loads for people in the hills."
        for i in range(12)
    ),  # ~250 tokens: many KV blocks
]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion in one sentence.",
    "List three primary colours.",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "Give me a name for a pet llama.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What is the boiling point of water in Fahrenheit?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Who wrote 'Pride and Prejudice'?",
    "Suggest a healthy breakfast.",
    "How many legs does a spider have?",
    "What does HTTP stand for?",
    "Tell me a fun fact about octopuses.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def ours():
    net, source = load_model(None)
    assert source.kind == "gguf"
    assert net.tok_embeddings.weight.dtype == torch.float32  # "auto" on CPU for a small model
    return net


@pytest.fixture(scope="module")
def reference(smollm_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[list[int]]:
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a mammal."}], tokenize=False, add_generation_prompt=True
    )
    return [hf_tokenizer.encode(t, add_special_tokens=False) for t in [*TEXTS, chat]]


def chunk_sizes(n: int) -> list[int]:
    """Chunked prefill of 7, then 13, then the rest but the last four, which come as decode steps."""
    sizes, left = [], n - min(n, 4)
    for size in (7, 13, left):
        take = min(size, left)
        if take:
            sizes.append(take)
            left -= take
    return sizes + [1] * min(n, 4)


def batched_mixed_logits(net, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts in shared steps, each taking a different chunk size per step (1 to 32 tokens)."""
    cache, seqs = new_seqs(net, prompts, seed=1)
    cycle = [1, 9, 3, 32, 1, 17, 5]
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    for t in range(10_000):
        work = [(i, s, min(cycle[(t + i) % len(cycle)], len(s.ids) - s.done))
                for i, s in enumerate(seqs) if s.done < len(s.ids)]
        if not work:
            break
        for (i, _, _), logits in zip(work, step(net, cache, [(s, n) for _, s, n in work]), strict=True):
            out[i].append(logits)
    return [torch.cat(parts) for parts in out]


def test_logits_match_transformers(ours, reference, prompts, record_property) -> None:
    with torch.no_grad():
        refs = [reference(torch.tensor([ids])).logits[0] for ids in prompts]
    mixed = batched_mixed_logits(ours, prompts)
    worst = 0.0
    for ids, ref, batched in zip(prompts, refs, mixed, strict=True):
        errors = {
            "full": rel_err(forward_logits(ours, ids), ref),
            "chunked": rel_err(forward_logits(ours, ids, chunk_sizes(len(ids))), ref),
            "batched": rel_err(batched, ref),
        }
        print(f"{len(ids):4d} tokens: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        worst = max(worst, *errors.values())
        assert max(errors.values()) <= 1e-3, errors
    print(f"parity: max relative logit error {worst:.2e} over {len(prompts)} prompts")
    record_property("max_relative_logit_error", worst)
    assert len(prompts) >= 8


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, one token at a time over its own KV cache."""
    out: list[int] = []
    with torch.no_grad():
        result = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(torch.tensor([[token]]), past_key_values=result.past_key_values, use_cache=True)
    return out


def test_greedy_continuations_match_transformers(ours, reference, hf_tokenizer, record_property) -> None:
    chats = [
        hf_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True)
        for q in QUESTIONS
    ]
    prompts = [hf_tokenizer.encode(c, add_special_tokens=False) for c in chats]
    mine = greedy(ours, prompts, NEW_TOKENS)
    theirs = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    agree = sum(a == b for a, b in zip(mine, theirs, strict=True))
    for q, a, b in zip(QUESTIONS, mine, theirs, strict=True):
        if a != b:
            print(f"differs on {q!r}:\n  ours: {hf_tokenizer.decode(a)!r}\n  ref:  {hf_tokenizer.decode(b)!r}")
    print(f"parity: greedy {NEW_TOKENS}-token continuations identical on {agree}/{len(prompts)} prompts")
    record_property("greedy_agreement", f"{agree}/{len(prompts)}")
    assert all(len(a) == NEW_TOKENS for a in mine)
    assert len({tuple(a) for a in mine}) > len(mine) // 2  # real, varied answers
    assert agree >= 15
