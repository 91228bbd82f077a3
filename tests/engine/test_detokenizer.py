"""Tests for incremental detokenization on a byte-level BPE and a SentencePiece-style tokenizer."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from llamaserve.engine.detokenizer import IncrementalDetokenizer

PIECES = [
    "the", "quick", "brown", "fox", " ", " ", "  ", "\n", ",", ".", "!", "Hello", "world", "don't",
    "é", "ñ", "ü", "😀", "🎉", "👍🏽", "世界", "你好", "日本語", "한국어", "Ω", "≈", "→", "12", "345",
]  # fmt: skip


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 25)))


@pytest.fixture(scope="module")
def sp_tokenizer() -> Any:
    """A tiny Llama-style tokenizer: Metaspace pre-tokenizer, BPE with byte fallback for unseen chars."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world, hello there! Don't stop the string.",
        "Sampling and decoding text incrementally is fun, 12345.",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=180, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=50, show_progress=False
    )
    tok.train_from_iterator(corpus * 5, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # SentencePiece's byte-fallback pieces are ordinary vocabulary entries
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    # Llama's decoder: "▁" -> " ", byte pieces -> bytes, then drop the leading space of the text.
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("hf_tokenizer" if request.param == "byte_level" else "sp_tokenizer")


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    """Feed ids `step` at a time; return every delta, the flush included."""
    deltas = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [*deltas, detok.flush()]


def test_sentencepiece_fixture_uses_byte_fallback_and_leading_spaces(sp_tokenizer: Any) -> None:
    tokens = sp_tokenizer.convert_ids_to_tokens(encode(sp_tokenizer, "Hello world 世"))
    assert tokens[0].startswith("▁") and any(t.startswith("▁") for t in tokens[1:])
    assert "<0xE4>" in tokens  # 世 is not in the vocabulary: it is three byte pieces
    assert sp_tokenizer.decode(encode(sp_tokenizer, "world")) == "world"  # the leading space is stripped


def test_deltas_concatenate_to_full_decode(tokenizer: Any) -> None:
    rng = random.Random(0)
    for trial in range(200):
        prompt = encode(tokenizer, random_text(rng)) if trial % 4 else []
        output = encode(tokenizer, random_text(rng))
        detok = IncrementalDetokenizer(tokenizer, prompt, stop=[])
        deltas = stream(detok, output, step=1 + trial % 3)
        # With a prompt the first output token keeps its leading space (SentencePiece strips it only at
        # the very start of a text), so compare with the output's part of the whole decode.
        full = tokenizer.decode(prompt + output)
        assert "".join(deltas) == full[len(tokenizer.decode(prompt)) :]
        assert not any("\ufffd" in d for d in deltas), deltas
        if not prompt:
            assert "".join(deltas) == tokenizer.decode(output)
        assert detok.stop_reason is None


def test_random_token_ids_match_full_decode(hf_tokenizer: Any) -> None:
    """Arbitrary ids (incomplete or invalid UTF-8, special tokens) still add up to decode()."""
    rng = random.Random(1)
    for trial in range(150):
        output = [rng.randrange(len(hf_tokenizer)) for _ in range(rng.randint(1, 40))]
        output += [rng.choice([0, 1, 2]) for _ in range(trial % 3)]  # special tokens
        rng.shuffle(output)
        skip = trial % 2 == 0
        detok = IncrementalDetokenizer(hf_tokenizer, [], stop=[], skip_special_tokens=skip)
        assert "".join(stream(detok, output)) == hf_tokenizer.decode(output, skip_special_tokens=skip)


def test_first_token_keeps_its_leading_space_after_a_prompt(sp_tokenizer: Any) -> None:
    ids = encode(sp_tokenizer, "Hello world there")
    detok = IncrementalDetokenizer(sp_tokenizer, ids[:1], stop=[])
    assert "".join(stream(detok, ids[1:])) == " world there"


def test_prompt_ending_inside_a_character(tokenizer: Any) -> None:
    """A character the prompt leaves unfinished is completed in the output, not lost or garbled."""
    ids = encode(tokenizer, "ab 😀世界 done")
    for cut in range(1, len(ids)):
        detok = IncrementalDetokenizer(tokenizer, ids[:cut], stop=[])
        deltas = stream(detok, ids[cut:])
        # The prompt's text ends before its unfinished character; the output's text starts with it.
        clean = max(k for k in range(cut + 1) if not tokenizer.decode(ids[:k]).endswith("\ufffd"))
        assert tokenizer.decode(ids[:clean]) + "".join(deltas) == tokenizer.decode(ids), (cut, deltas)
        assert not any("\ufffd" in d for d in deltas)


def test_decode_window_stays_small(hf_tokenizer: Any) -> None:
    """Per-token cost is bounded: only a few tokens are decoded each step, however long the output."""
    lengths: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            lengths.append(len(ids))
            return hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(2)
    output = encode(hf_tokenizer, "".join(random_text(rng) for _ in range(40)))
    detok = IncrementalDetokenizer(Counting(), encode(hf_tokenizer, "a prompt " * 50), stop=["STOP"])
    stream(detok, output)
    assert len(output) > 300 and max(lengths) <= 12


def test_stop_string_spanning_two_tokens(tokenizer: Any) -> None:
    ids = encode(tokenizer, "The quick brown fox jumps")
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert not any("ck bro" in tokenizer.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["ck bro"])
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) == "The qui"
    assert detok.stop_reason == "ck bro"
    stopped_at = next(i for i, p in enumerate(pieces) if "ck bro" in p)
    assert all(d == "" for d in deltas[stopped_at + 1 :])
    assert detok.flush() == "" and detok.add([ids[0]]) == ""


def test_text_before_stop_is_complete_and_earliest_stop_wins(tokenizer: Any) -> None:
    ids = encode(tokenizer, "Hello world 😀 the lazy dog barks")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["barks", "lazy", "never"])
    assert "".join(stream(detok, ids)) == "Hello world 😀 the "
    assert detok.stop_reason == "lazy"


def test_stop_string_made_of_byte_tokens(tokenizer: Any) -> None:
    ids = encode(tokenizer, "hi 世界 there")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["界"])
    assert "".join(stream(detok, ids)) == "hi 世"
    assert detok.stop_reason == "界"


def test_include_stop_str_in_output(tokenizer: Any) -> None:
    ids = encode(tokenizer, "The quick brown fox jumps")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["ck bro"], include_stop_str_in_output=True)
    assert "".join(stream(detok, ids, step=2)) == "The quick bro"
    assert detok.stop_reason == "ck bro"


def test_holdback_is_released_by_flush(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["zzzzzz"])
    streamed = "".join(detok.add([t]) for t in ids)
    assert text.startswith(streamed) and len(text) - len(streamed) <= 5
    assert streamed + detok.flush() == text
    assert detok.stop_reason is None


def test_deltas_with_stop_strings_never_contain_them(hf_tokenizer: Any) -> None:
    rng = random.Random(3)
    for _ in range(100):
        text = random_text(rng)
        stop = rng.choice(["fox", "o w", "😀", " 世", "!\n", "zzz"])
        detok = IncrementalDetokenizer(hf_tokenizer, [], stop=[stop])
        out = "".join(stream(detok, encode(hf_tokenizer, text)))
        expected = text.split(stop)[0]
        assert out == expected and (detok.stop_reason == stop) == (stop in text)


def test_empty_stop_string_raises(hf_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(hf_tokenizer, [], stop=[""])
