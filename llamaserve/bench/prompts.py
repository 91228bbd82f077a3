"""The benchmark's prompts: a built-in set of 64 short chat prompts, or a JSONL file of them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# A prompt is a plain string (sent as one user message to chat) or a list of chat messages.
Prompt = str | list[dict[str, Any]]

BUILTIN_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for sleeping better.",
    "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "List five fruits that are high in vitamin C.",
    "How does a bicycle stay upright when it is moving?",
    "Write a short story about a robot who learns to paint.",
    "What is the difference between weather and climate?",
    "Suggest a name for a bakery that specialises in sourdough bread.",
    "How do vaccines train the immune system?",
    "Describe the taste of coffee to someone who has never had it.",
    "What are prime numbers? Give the first ten.",
    "Write a limerick about a cat who loves the rain.",
    "Explain what a black hole is in simple terms.",
    "How can I make my houseplants grow better indoors?",
    "Compare trains and planes for travelling 500 km.",
    "What is the Pythagorean theorem and where is it used?",
    "Write a polite email declining a meeting invitation.",
    "Why do cats purr?",
    "Give a recipe for a simple tomato soup.",
    "What were the main causes of the First World War?",
    "Explain recursion with an example.",
    "Describe a lighthouse on a stormy night.",
    "How does compound interest work? Show a small example.",
    "What is the tallest mountain in the world, and how tall is it?",
    "Write a motivational message for someone starting a new job.",
    "How do bees make honey?",
    "What is the difference between a list and a tuple in Python?",
    "Plan a one-day walking tour of a small coastal town.",
    "Explain how a refrigerator keeps food cold.",
    "Write four lines of a poem about the moon over the sea.",
    "What are the benefits of learning a second language?",
    "How do I calculate the area of a circle with radius 3?",
    "Describe the water cycle step by step.",
    "Give me a fun fact about octopuses.",
    "What is an API, and why do programmers use them?",
    "Write a dialogue between a teacher and a curious student about gravity.",
    "How should I prepare for a job interview?",
    "Why do we have leap years?",
    "Explain the rules of chess in a short paragraph.",
    "What is machine learning? Keep it under 100 words.",
    "Write a product description for a reusable water bottle.",
    "How do volcanoes form?",
    "What is the meaning of the idiom 'break the ice'?",
    "Suggest three board games for a family evening and say why.",
    "Explain the difference between RAM and disk storage.",
    "Write a thank-you note to a neighbour who watered my plants.",
    "How does the heart pump blood around the body?",
    "What is a good way to start learning to play the guitar?",
    "Describe a busy market in the morning, using all five senses.",
    "Why does ice float on water?",
    "Write a SQL query that counts orders per customer.",
    "What are the phases of the moon?",
    "Give me a packing list for a weekend camping trip.",
    "Explain inflation and how it affects savings.",
    "Tell me a short fable with a moral about patience.",
    "How do noise-cancelling headphones work?",
    "What is the difference between a virus and a bacterium?",
    "Write a two-paragraph introduction for an essay on renewable energy.",
)


def load_jsonl(path: str | Path) -> list[Prompt]:
    """Read one JSON object per line, each with "prompt" (a string) or "messages" (chat messages)."""
    prompts: list[Prompt] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
            prompts.append(obj["messages"])
        else:
            raise ValueError(f'{where}: expected an object with "prompt" (a string) or "messages" (a list)')
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def sample_prompts(pool: list[Prompt], num: int, seed: int) -> list[Prompt]:
    """`num` prompts: the pool in a seeded random order, repeated as often as needed."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[order[i % len(order)]] for i in range(num)]
