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
        for i in range(5)
    ),  # ~110 tokens: seven KV blocks
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
    net, source = load_model(None, quantization="none")
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


def batched_chunked_logits(net, prompts: list[list[int]], decode_steps: int = 4) -> list[torch.Tensor]:
    """All prompts in shared steps as the engine runs them: chunked prefill with a different chunk size
    per sequence and step (1 to 32 tokens), then the last `decode_steps` tokens as pure decode steps."""
    cache, seqs = new_seqs(net, prompts, seed=1)
    cycle = [1, 9, 3, 32, 1, 17, 5]
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    for t in range(10_000):
        work = [(i, s, min(cycle[(t + i) % len(cycle)], len(s.ids) - decode_steps - s.done))
                for i, s in enumerate(seqs)]
        work = [w for w in work if w[2] > 0]
        if not work:
            break
        for (i, _, _), logits in zip(work, step(net, cache, [(s, n) for _, s, n in work]), strict=True):
            out[i].append(logits)
    while any(s.done < len(s.ids) for s in seqs):
        work = [(i, s) for i, s in enumerate(seqs) if s.done < len(s.ids)]
        for (i, _), logits in zip(work, step(net, cache, [(s, 1) for _, s in work]), strict=True):
            out[i].append(logits)
    return [torch.cat(parts) for parts in out]


def test_logits_match_transformers(ours, reference, prompts, record_property) -> None:
    with torch.no_grad():
        refs = [reference(torch.tensor([ids])).logits[0] for ids in prompts]
    batched = batched_chunked_logits(ours, prompts)
    worst = 0.0
    for ids, ref, chunked in zip(prompts, refs, batched, strict=True):
        errors = {"full": rel_err(forward_logits(ours, ids), ref), "chunked": rel_err(chunked, ref)}
        print(f"{len(ids):4d} tokens: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        worst = max(worst, *errors.values())
        assert max(errors.values()) <= 1e-3, errors
    print(f"parity: max relative logit error {worst:.2e} over {len(prompts)} prompts")
    record_property("max_relative_logit_error", worst)
    assert len(prompts) >= 8


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy continuations: one left-padded batch through generate()."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n)
    return out[:, width:].tolist()


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens up to and including the first EOS (generate() pads a finished sequence after it)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def test_greedy_continuations_match_transformers(ours, reference, hf_tokenizer, record_property) -> None:
    """32 greedy tokens: ours over the paged cache (batched prefill, 31 decode steps) vs generate()."""
    chats = [
        hf_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                         add_generation_prompt=True)
        for q in QUESTIONS
    ]
    prompts = [hf_tokenizer.encode(c, add_special_tokens=False) for c in chats]
    eos = reference.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    full = greedy(ours, prompts, NEW_TOKENS)
    mine = [until_eos(t, eos) for t in full]
    theirs = [until_eos(t, eos) for t in hf_greedy(reference, prompts, NEW_TOKENS)]
    agree = sum(a == b for a, b in zip(mine, theirs, strict=True))
    for q, a, b in zip(QUESTIONS, mine, theirs, strict=True):
        if a != b:
            print(f"differs on {q!r}:\n  ours: {hf_tokenizer.decode(a)!r}")
            print(f"  ref:  {hf_tokenizer.decode(b)!r}")
    print(f"parity: greedy {NEW_TOKENS}-token continuations identical on {agree}/{len(prompts)} prompts")
    record_property("greedy_agreement", f"{agree}/{len(prompts)}")
    assert all(len(a) == NEW_TOKENS for a in full)
    assert len({tuple(a) for a in mine}) > len(mine) // 2  # real, varied answers
    assert agree >= 15
