"""Our Tokenizer agrees with transformers (and SentencePiece) on text, chat prompts and stop tokens."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from llamaserve.loader.errors import ModelLoadError
from llamaserve.loader.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, emoji 🦙🚀 and a flag 🇫🇷",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    "",
    "<|im_start|>user\nspecial tokens in plain text<|im_end|>",
]

CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?"},
    ],
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The GGUF tokenizer cache in a temporary folder, so tests neither read nor write the user's."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("LLAMASERVE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def smollm_meta(smollm_path) -> dict:
    """The GGUF metadata, parsed once (slow: ~5 s) and handed to load_tokenizer as the engine does."""
    from llamaserve.loader.gguf import metadata, open_gguf

    return metadata(open_gguf(smollm_path))


@pytest.fixture(scope="module")
def tokenizer(smollm_path, smollm_meta, cache_dir) -> Tokenizer:
    return load_tokenizer(smollm_path, gguf_metadata=smollm_meta)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, hf_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    bare = hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special_tokens=False) == bare
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids)


def test_plain_text_roundtrips(tokenizer) -> None:
    for text in TEXTS[:-1]:  # the last holds special tokens, which decoding drops
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_prompts_match_transformers(tokenizer, hf_tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.render_chat(messages) == text
    assert text.endswith("<|im_start|>assistant\n")
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert tokenizer.encode_chat(messages) == list(expected)
    without = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tokenizer.render_chat(messages, add_generation_prompt=False) == without


def test_eos_token_ids_hold_the_models_eos(tokenizer, hf_tokenizer) -> None:
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert hf_tokenizer.eos_token_id in tokenizer.eos_token_ids
    assert im_end in tokenizer.eos_token_ids  # the chat turn terminator stops generation
    assert tokenizer.vocab_size == len(hf_tokenizer)


def test_cached_tokenizer_equals_the_converted_one(smollm_path, smollm_meta, cache_dir, tokenizer) -> None:
    """The second load reads the tokenizer.json cached by the first; nothing may change."""
    assert list(cache_dir.glob("tokenizers/*/tokenizer.json"))
    again = load_tokenizer(smollm_path, gguf_metadata=smollm_meta)
    assert again.chat_template == tokenizer.chat_template
    assert again.eos_token_ids == tokenizer.eos_token_ids
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    messages = CONVERSATIONS["multi_turn"]
    assert again.encode_chat(messages) == tokenizer.encode_chat(messages)


# A Llama 2 style tokenizer: SentencePiece BPE with byte fallback, trained here on a few sentences.
SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Llamas are domesticated South American camelids, used as pack animals.",
    "def add(a, b):\n    return a + b",
    "Hello world! How are you today? I am fine, thank you.",
] * 20


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS), model_writer=buf, vocab_size=320, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, add_dummy_prefix=True, minloglevel=2,
    )  # Meta's Llama 2 options: identity normalisation, byte fallback, digits split
    return buf.getvalue()


@pytest.fixture(scope="module")
def llama2_folder(tmp_path_factory, spm_model: bytes) -> Path:
    """A folder laid out like meta-llama/Llama-2-7b-hf's tokenizer files, with no chat template."""
    folder = tmp_path_factory.mktemp("llama2")
    (folder / "tokenizer.model").write_bytes(spm_model)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def test_llama2_sentencepiece_matches_transformers(llama2_folder: Path, spm_model: bytes) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = load_tokenizer(llama2_folder)
    ref = AutoTokenizer.from_pretrained(str(llama2_folder))
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == [2]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert ids[0] == 1  # BOS added
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        if not text.startswith(" ") and "<" not in text:
            # SentencePiece itself agrees where transformers applies no special handling.
            assert ids == [1, *sp.encode(text)]
            assert tok.decode(ids) == sp.decode(sp.encode(text))


def test_llama2_chat_format_when_the_folder_has_no_template(llama2_folder: Path) -> None:
    tok = load_tokenizer(llama2_folder)
    system_user = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hello"}]
    assert tok.render_chat(system_user) == "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHello [/INST]"
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.render_chat(turns) == "<s>[INST] Hi [/INST] Hello there. </s><s>[INST] Bye [/INST]"
    ids = tok.encode_chat(system_user)
    assert ids[0] == 1 and ids[1] != 1  # the template's <s> is the one BOS: none added on top
    assert ids[-1] != 2
    with pytest.raises(ValueError, match="alternate"):
        tok.render_chat([{"role": "assistant", "content": "I speak first"}])


def test_chat_template_file_overrides_the_fallback(llama2_folder: Path, tmp_path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok = load_tokenizer(llama2_folder, chat_template_file=template)
    assert tok.render_chat(CONVERSATIONS["system"]) == (
        "[system] You are a terse assistant.\n[user] Name three colours.\n[assistant]"
    )


def test_unreadable_chat_template_file_is_a_load_error(llama2_folder: Path, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read chat template"):
        load_tokenizer(llama2_folder, chat_template_file=tmp_path / "missing.jinja")
