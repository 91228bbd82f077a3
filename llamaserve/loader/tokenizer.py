"""Tokenizers and chat templates, from GGUF metadata or HF tokenizer files, via transformers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from llamaserve.loader.errors import ModelLoadError

# Meta's Llama 2 chat format, for Llama 2 files that carry no template (older GGUF conversions). Tokenized
# as one text, its pieces between <s> and </s> are the turn strings Meta's chat_completion encodes one by
# one, each with SentencePiece's dummy prefix (see _with_sentencepiece_prefix).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


class Tokenizer:
    """A transformers tokenizer plus the model's stop tokens and chat template."""

    def __init__(self, hf: Any, chat_template: str | None, eos_token_ids: list[int]) -> None:
        self.hf = hf
        self.chat_template = chat_template
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.bos_token_id: int | None = hf.bos_token_id
        self.vocab_size = len(hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, continue_final: bool = False) -> str:
        """The prompt text, rendered exactly as transformers' apply_chat_template renders it.

        `continue_final`: the last message is an assistant's reply to continue (a prefill), left open."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template: use the completions API or --chat-template")
        try:
            return self.hf.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final, tools=tools,
                continue_final_message=continue_final,
            )
        except Exception as e:  # jinja2 errors, raise_exception() in templates
            raise ValueError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, continue_final: bool = False) -> list[int]:
        # transformers tokenizes a rendered template without adding special tokens again.
        text = self.render_chat(messages, add_generation_prompt, tools, continue_final)
        return self.encode(text, add_special_tokens=False)


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMASERVE_CACHE", Path.home() / ".cache" / "llamaserve"))


# Part of the tokenizer cache's key: bump it when what is cached changes (2: SentencePiece's dummy prefix).
CACHE_VERSION = 2


def _with_sentencepiece_prefix(hf: Any) -> None:
    """A SentencePiece vocabulary tokenizes as SentencePiece does (Meta's, llama.cpp's): every text segment
    between special tokens gets the dummy prefix "▁", and leading spaces are kept.

    transformers builds Metaspace(prepend_scheme="first"): a prefix only at the very start of the text, and
    none for text that starts with a space, so " hi" is "▁hi" not "▁▁hi", and "<s>[INST]"
    is "<s>" "[" "INST" "]" where Llama 2 has "<s>" "▁[" "INST" "]". SentencePiece's own normalisation
    (what transformers' legacy Llama tokenizer and its Phi-3 GGUF builder use) instead: the prefix, then
    spaces as "▁", with no pre-tokenizer. Special tokens are split out before normalisation, so each
    segment between them is one SentencePiece encode: Meta's chat_completion encodes each turn string alone
    ("[INST] user [/INST] answer " between <s> and </s>), which is what the rendered template's segments
    are. The decoder (Strip of one leading space) is the same either way. A no-op unless the backend has the
    pre-tokenizer transformers builds for Llama (a tokenizer loaded from our cache already has the fix).
    """
    from tokenizers import normalizers, pre_tokenizers

    backend = hf.backend_tokenizer
    pre = backend.pre_tokenizer
    if not (
        isinstance(pre, pre_tokenizers.Metaspace)
        and str(pre.prepend_scheme).lower() == "first"
        and not pre.split
    ):
        return
    steps = [normalizers.Prepend(pre.replacement), normalizers.Replace(" ", pre.replacement)]
    if backend.normalizer is not None:
        steps.insert(0, backend.normalizer)
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None


def _from_gguf(path: Path, meta: dict[str, Any] | None = None) -> tuple[Any, list[int]]:
    """transformers converts a GGUF vocabulary in ~10 s; the result is cached as tokenizer.json."""
    from transformers import AutoTokenizer

    if meta is None:
        from llamaserve.loader.gguf import metadata, open_gguf

        meta = metadata(open_gguf(path))
    if meta.get("tokenizer.ggml.model") not in ("llama", "gpt2"):
        raise ModelLoadError(
            f"{path.name}: unsupported tokenizer model {meta.get('tokenizer.ggml.model')!r} (llama or gpt2)"
        )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    stat = path.stat()
    source = f"{CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cached = cache_dir() / "tokenizers" / hashlib.sha256(source.encode()).hexdigest()[:16]
    # SentencePiece vocabularies with a dummy prefix: llama.cpp's default, unless the file says otherwise.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    sentencepiece = meta["tokenizer.ggml.model"] == "llama" and bool(prefix)
    fresh = not (cached / "tokenizer.json").is_file()
    if fresh:
        try:
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{path.name}: cannot build the tokenizer from its GGUF vocabulary "
                                 f"({type(e).__name__}: {e})") from e
    else:
        hf = AutoTokenizer.from_pretrained(str(cached))
    if sentencepiece:
        _with_sentencepiece_prefix(hf)  # cached with it: a no-op on a cached one
    if fresh:
        try:
            hf.save_pretrained(str(cached))
        except OSError as e:
            logging.getLogger("llamaserve").warning("cannot cache the tokenizer in %s: %s", cached, e)
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                            "tokenizer.ggml.eom_token_id") if k in meta]
    return hf, [int(e) for e in eos]


def _from_folder(folder: Path) -> tuple[Any, list[int]]:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: no usable tokenizer files ({e})") from e
    eos: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        eos = value if isinstance(value, list) else [value] if value is not None else []
    return hf, eos


def load_tokenizer(
    path: Path, chat_template_file: Path | None = None, gguf_metadata: dict[str, Any] | None = None
) -> Tokenizer:
    """The tokenizer of a GGUF file or HF folder; chat_template_file overrides the model's template."""
    hf, eos = _from_folder(path) if path.is_dir() else _from_gguf(path, gguf_metadata)
    if hf.eos_token_id is not None:
        eos.append(hf.eos_token_id)
    template = getattr(hf, "chat_template", None)
    if chat_template_file is not None:
        try:
            template = Path(chat_template_file).read_text()
        except OSError as e:
            raise ModelLoadError(f"cannot read chat template {chat_template_file}: {e}") from e
    elif template is None and hf.bos_token == "<s>" and hf.eos_token == "</s>":
        template = LLAMA2_CHAT_TEMPLATE  # a Llama 2 model without a template of its own
    return Tokenizer(hf, template, eos)
