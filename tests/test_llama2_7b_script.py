"""benchmarks/llama2_7b.py: its random GGUF files parse, load dense and int4 alike, and tokenize."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from llamaserve.config import ModelConfig
from llamaserve.loader.tokenizer import Tokenizer, load_tokenizer
from llamaserve.loader.weights import inspect_model, load_model
from llamaserve.model import native
from llamaserve.model.quant import CastLinear, GGUFLinear, Int4Linear, Int8Linear
from tests.benchmark_scripts import load_benchmark
from tests.checkpoints import finish_with_placeholders, rel_err
from tests.paged import forward_logits

TINY = {"hidden": 256, "ffn": 512, "heads": 4, "vocab": 512}
IDS = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
LLAMA2_7B = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("llama2_7b")


def test_the_7b_plan_has_llama2_7bs_parameters_and_file_size(script: ModuleType) -> None:
    plan = script.tensor_plan(32, 4096, 11008, 32, 32, 32000, QT.Q4_0, QT.Q6_K)
    assert sum(int(np.prod(shape)) for _, shape, _ in plan) == LLAMA2_7B.num_parameters == 6_738_415_616
    size = sum(
        int(np.prod(shape)) // gguf.GGML_QUANT_SIZES[k][0] * gguf.GGML_QUANT_SIZES[k][1]
        for _, shape, k in plan
    )
    assert 3.82e9 < size < 3.84e9  # llama.cpp's llama-2-7b.Q4_0.gguf: 3.83 GB


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q5_K_M"])
def test_the_k_m_recipes_give_q6_k_to_llama_cpps_more_bits_layers(script: ModuleType, recipe: str) -> None:
    base = script.RECIPES[recipe]
    assert base == {"Q4_K_M": QT.Q4_K, "Q5_K_M": QT.Q5_K}[recipe]
    plan = script.tensor_plan(32, 4096, 11008, 32, 32, 32000, base, QT.Q6_K, QT.Q6_K)
    q6 = sorted(int(n.split(".")[1]) for n, _, t in plan if t == QT.Q6_K and n.endswith("attn_v.weight"))
    # llama.cpp's use_more_bits(i, 32): i < 4, i >= 28, and (i - 4) % 3 == 2 between.
    assert q6 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    down = [int(n.split(".")[1]) for n, _, t in plan if t == QT.Q6_K and n.endswith("ffn_down.weight")]
    assert sorted(down) == q6
    assert Counter(t for _, _, t in plan) == Counter({base: 32 * 7 - 32 + 1, QT.Q6_K: 33, QT.F32: 65})


@pytest.mark.parametrize(
    ("qtype", "more_bits_type", "file_type"),
    [
        (QT.Q4_K, None, gguf.LlamaFileType.MOSTLY_Q4_K_S),
        (QT.Q4_K, QT.Q6_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
        (QT.Q5_K, None, gguf.LlamaFileType.MOSTLY_Q5_K_S),
        (QT.Q5_K, QT.Q6_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    ],
    ids=["Q4_K", "Q4_K_M", "Q5_K", "Q5_K_M"],
)
def test_the_file_type_names_the_recipe(
    script: ModuleType, tmp_path: Path, qtype: QT, more_bits_type: QT | None, file_type: gguf.LlamaFileType
) -> None:
    path = script.write_gguf(tmp_path / "tiny.gguf", qtype, 1, more_bits_type=more_bits_type, **TINY)
    meta = inspect_model(str(path)).metadata
    assert meta["general.file_type"] == file_type
    assert meta["general.name"] == f"llama-2-7b-shaped random {file_type.name.removeprefix('MOSTLY_')}"


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_random_blocks_are_finite_with_the_intended_spread(script: ModuleType, qtype: QT) -> None:
    raw = script.random_blocks(np.random.default_rng(0), 64, 512, qtype)
    w = dequantize(raw, qtype)
    assert np.isfinite(w).all()
    assert 0.8 * script.WEIGHT_STD < w.std() < 1.2 * script.WEIGHT_STD


def test_synthetic_vocab_is_sentencepiece_shaped(script: ModuleType) -> None:
    tokens, scores, types = script.synthetic_vocab(32000)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {6}
    assert "\u2581the" in tokens and "\u2581a" in tokens
    pieces = set(tokens[259:])
    assert all(len(p) == 1 or p[:-1] in pieces for p in pieces)  # merges can reach every piece


# -- LLaMA's vocabulary (npm's llama-tokenizer-js, cached in .bench/) ------------------------------------
# Llama 2's ids (SentencePiece, as llama.cpp and Meta's code tokenize) for text that begins with a space, or
# that follows a special token: the first three are llama-tokenizer-js's own test cases.
LEADING_SPACE_IDS = {
    " grabbed": [1, 29871, 2646, 1327, 287],
    "           grabbed": [1, 9651, 2646, 1327, 287],
    " \n": [1, 259, 13],
    "<s>[INST] hi [/INST]": [1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962],  # Meta's chat prompt
}


@pytest.fixture(scope="module")
def llama_pieces(script: ModuleType) -> tuple[list[str], list[float], list[int]]:
    if not (script.LLAMA_VOCAB_CACHE / "llama-tokenizer.js").is_file() and shutil.which("npm") is None:
        pytest.skip(f"no npm and no {script.LLAMA_VOCAB_CACHE}: LLaMA's vocabulary cannot be fetched")
    return script.llama_vocab()  # with npm at hand, a failed fetch fails the test


@pytest.fixture(scope="module")
def llama_file(script: ModuleType, llama_pieces, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama-vocab") / "tiny.gguf"
    return script.write_gguf(path, QT.Q4_0, 1, **{**TINY, "vocab": 32000}, pieces=llama_pieces)


@pytest.fixture(scope="module")
def llama_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def llama_tokenizer(llama_file: Path, llama_cache: Path) -> Tokenizer:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMASERVE_CACHE", str(llama_cache))
        return load_tokenizer(llama_file)


@pytest.fixture(scope="module")
def llama_sentencepiece(llama_pieces):
    """SentencePiece itself with LLaMA's vocabulary, set up as Meta's tokenizer.model is (BPE scored by the
    pieces' scores, byte fallback, identity normalisation, the dummy prefix, whitespace kept): the reference
    that Meta's generation.py encodes with, independent of transformers."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    for token, score, kind in zip(*llama_pieces, strict=True):
        model.pieces.add(piece=token, score=score, type=kind)
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(llama_pieces[0]), True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = (
        "identity", True, False, True
    )
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def test_the_llama_vocab_is_llamas_with_sentencepiece_scores(script: ModuleType, llama_pieces) -> None:
    from transformers.tokenization_utils_base import generate_merges

    tokens, scores, types = llama_pieces
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)] and set(types[3:259]) == {6}
    assert set(types[259:]) == {1} and scores[:259] == [0.0] * 259
    assert [tokens[i] for i in (15043, 3186, 518, 25580, 29962, 29871)] == [
        "\u2581Hello", "\u2581world", "\u2581[", "INST", "]", "\u2581"
    ]
    # transformers' GGUF conversion rebuilds merges from the scores: the package's (HF's tokenizer.json),
    # merging the same pieces in the same order; only merges of one piece may trade places.
    source = script.fetch_llama_tokenizer_js().read_text("utf-8")
    _, merges = script.decode_llama_tokenizer_js(source)
    rebuilt = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores, strict=True)))
    assert len(rebuilt) == len(merges) == 61249 and set(rebuilt) == set(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    assert [scores[ids[a + b]] for a, b in rebuilt] == [scores[ids[a + b]] for a, b in merges]


def test_the_llama_vocab_tokenizes_as_llama_2(
    script: ModuleType, llama_file: Path, llama_tokenizer: Tokenizer, tmp_path: Path, monkeypatch
) -> None:
    tok = llama_tokenizer
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("[INST]") == [1, 518, 25580, 29962]  # "▁[" "INST" "]": the dummy prefix, no space
    assert tok.encode("[INST]", add_special_tokens=False) == [518, 25580, 29962]
    assert tok.decode([1, 15043, 3186]) == "Hello world" and tok.eos_token_ids == [2]
    monkeypatch.setenv("LLAMASERVE_CACHE", str(tmp_path / "cache"))
    assert script.check_tokenizer(llama_file, llama=True)[0] == 1  # the script's own check passes
    # llama-tokenizer-js's test cases (ids from Llama's tokenizer), but those of LEADING_SPACE_IDS.
    source = script.fetch_llama_tokenizer_js().read_text("utf-8")
    cases = re.findall(r'testCase\(("(?:[^"\\]|\\.)*"|\'[^\']*\'),\s*\[([\d,\s]+)\]\)', source)
    texts = {json.loads(s, strict=False) if s[0] == '"' else s[1:-1]: ids for s, ids in cases}
    expected = {t: [int(i) for i in ids.split(",")] for t, ids in texts.items() if t not in LEADING_SPACE_IDS}
    assert len(expected) == 9 and any(len(ids) > 400 for ids in expected.values())  # with the long text
    assert {t: tok.encode(t) for t in expected} == expected


@pytest.mark.parametrize("text", list(LEADING_SPACE_IDS), ids=repr)
def test_the_llama_vocab_keeps_a_leading_space_as_sentencepiece_does(
    llama_tokenizer: Tokenizer, text: str
) -> None:
    ids = llama_tokenizer.encode(text, add_special_tokens=not text.startswith("<s>"))  # chat: own <s>
    assert ids == LEADING_SPACE_IDS[text]
    assert llama_tokenizer.decode(ids) == text.removeprefix("<s>")


def test_the_sentencepiece_reference_is_llama_2s(script: ModuleType, llama_sentencepiece) -> None:
    source = script.fetch_llama_tokenizer_js().read_text("utf-8")
    cases = re.findall(r'testCase\(("(?:[^"\\]|\\.)*"|\'[^\']*\'),\s*\[([\d,\s]+)\]\)', source)
    texts = {json.loads(s, strict=False) if s[0] == '"' else s[1:-1]: ids for s, ids in cases}
    expected = {t: [int(i) for i in ids.split(",")] for t, ids in texts.items()}
    assert len(expected) == 12 and " grabbed" in expected
    assert {t: [1, *llama_sentencepiece.encode(t)] for t in expected} == expected
    assert {t: [1, *llama_sentencepiece.encode(t)] for t in script.LLAMA_IDS} == script.LLAMA_IDS


SENTENCEPIECE_TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing spaces   ",
    " one leading space",
    "tabs\tand\nnew\n\nlines\r\n",
    "\n starts with a newline",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, emoji 🦙🚀",
    "numbers 1234567890 3.14159 -42 1e-5",
    " ",
    "",
]


@pytest.mark.parametrize("text", SENTENCEPIECE_TEXTS, ids=repr)
def test_the_llama_vocab_tokenizes_as_sentencepiece(
    llama_tokenizer: Tokenizer, llama_sentencepiece, text: str
) -> None:
    ids = llama_sentencepiece.encode(text)
    assert llama_tokenizer.encode(text, add_special_tokens=False) == ids
    assert llama_tokenizer.encode(text) == [1, *ids]
    assert llama_tokenizer.decode([1, *ids]) == llama_sentencepiece.decode(ids) == text


# -- Llama 2 chat prompts, as Meta's llama/generation.py chat_completion builds them ----------------------
B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
CHATS = {
    "single_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help? "},
        {"role": "user", "content": " Name three colours.\n"},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": "Bye"},
    ],
}


def metas_chat_ids(encode, messages: list[dict[str, str]]) -> list[int]:
    """chat_completion's prompt tokens: encode(turn) between BOS (1) and EOS (2), turn by turn."""
    if messages[0]["role"] == "system":
        first = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
        messages = [{"role": messages[1]["role"], "content": first}, *messages[2:]]
    ids: list[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2], strict=False):
        turn = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += [1, *encode(turn), 2]
    return [*ids, 1, *encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}")]


def test_llama2_chat_prompt_has_llama_2s_ids(llama_tokenizer: Tokenizer, llama_pieces) -> None:
    """Spelled out by hand as Llama 2's pieces ("<s>[INST] <<SYS>>\n" is 1, 518, 25580, 29962, 3532, ...),
    their ids looked up in the vocabulary: no tokenizer involved."""
    index = {piece: i for i, piece in enumerate(llama_pieces[0])}

    def ids(pieces: str) -> list[int]:
        return [index[p] for p in pieces.split(" ")]

    inst, end = ids("▁[ INST ]"), ids("▁[ / INST ]")
    assert inst == [518, 25580, 29962] and end == [518, 29914, 25580, 29962]
    b_sys, e_sys = ids("▁<< SY S >> <0x0A>"), ids("<0x0A> < </ SY S >> <0x0A> <0x0A>")
    assert b_sys == [3532, 14816, 29903, 6778, 13] and e_sys == [13, 29966, 829, 14816, 29903, 6778, 13, 13]
    question = ids("▁is ▁the ▁capital ▁of ▁France ?")
    assert llama_tokenizer.encode_chat(CHATS["single_turn"]) == [1, *inst, *ids("▁What"), *question, *end]
    assert llama_tokenizer.encode_chat(CHATS["system"]) == [  # "What" after "\n\n": no "▁"
        1, *inst, *b_sys, *ids("Answer ▁in ▁one ▁word ."), *e_sys, *ids("What"), *question, *end
    ]
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "Bye"}]
    assert llama_tokenizer.encode_chat(turns) == [
        1, *inst, *ids("▁Hi"), *end, *ids("▁Hello ! ▁How ▁can ▁I ▁help ? ▁"), 2,  # " help? " then </s>
        1, *inst, *ids("▁By e"), *end,
    ]


@pytest.mark.parametrize("name", list(CHATS))
def test_llama2_chat_prompts_are_metas(
    llama_tokenizer: Tokenizer, llama_sentencepiece, name: str
) -> None:
    tok, messages = llama_tokenizer, CHATS[name]
    assert tok.chat_template is not None and "<<SYS>>" in tok.chat_template  # the built-in Llama 2 format
    ids = tok.encode_chat(messages)
    assert ids == metas_chat_ids(llama_sentencepiece.encode, messages)
    # The same from our own encodes of whole turns, which begin a text as llama-tokenizer-js's cases do.
    assert ids == metas_chat_ids(lambda text: tok.encode(text, add_special_tokens=False), messages)
    assert ids.count(1) == (len(messages) + 1) // 2 and ids[-4:] == [518, 29914, 25580, 29962]
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s> [INST] ")  # "▁[" after <s>


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="the rendered template is tokenized as one text, so a <s> or </s> a user writes is a control "
    "token (as in transformers' apply_chat_template); Meta's sp.encode(turn) spells it out as text",
)
def test_llama2_chat_spells_out_special_tokens_in_user_text(llama_tokenizer, llama_sentencepiece) -> None:
    messages = [{"role": "user", "content": "what does </s><s> mean?"}]
    assert llama_tokenizer.encode_chat(messages) == metas_chat_ids(llama_sentencepiece.encode, messages)


def test_the_cached_llama_tokenizer_keeps_the_dummy_prefix(
    llama_file: Path, llama_cache: Path, llama_tokenizer: Tokenizer, monkeypatch
) -> None:
    """The tokenizer.json cached by the first load holds SentencePiece's normalisation; a second load reads
    it, and one cached without it (by transformers as is) is mended on loading."""
    monkeypatch.setenv("LLAMASERVE_CACHE", str(llama_cache))
    (cached,) = llama_cache.glob("tokenizers/*/tokenizer.json")
    saved = json.loads(cached.read_text("utf-8"))
    assert saved["pre_tokenizer"] is None
    assert [n["type"] for n in saved["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    messages = CHATS["multi_turn"]
    expected = {t: llama_tokenizer.encode(t) for t in [*LEADING_SPACE_IDS, *SENTENCEPIECE_TEXTS]}
    again = load_tokenizer(llama_file)
    assert {t: again.encode(t) for t in expected} == expected
    assert again.encode_chat(messages) == llama_tokenizer.encode_chat(messages)
    as_converted = {**saved, "normalizer": None, "pre_tokenizer": {
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}}
    cached.write_text(json.dumps(as_converted), "utf-8")
    mended = load_tokenizer(llama_file)
    assert {t: mended.encode(t) for t in expected} == expected
    assert mended.encode_chat(messages) == llama_tokenizer.encode_chat(messages)


def test_vocab_falls_back_to_synthetic_only_when_not_asked_for_llama(
    script: ModuleType, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(script.shutil, "which", lambda _: None)
    with pytest.raises(script.VocabUnavailable, match="npm is not installed"):
        script.fetch_llama_tokenizer_js(tmp_path / "absent")

    def unavailable() -> None:
        raise script.VocabUnavailable("no npm")

    monkeypatch.setattr(script, "llama_vocab", unavailable)
    assert script.vocab_pieces("synthetic") is None
    assert script.vocab_pieces(None) is None  # the default: LLaMA's if it can be had
    assert capsys.readouterr().err.strip() == "no LLaMA vocabulary, writing the synthetic one: no npm"
    with pytest.raises(script.VocabUnavailable):
        script.vocab_pieces("llama")


def test_the_7b_metadata_parses_to_llama2_7b(script: ModuleType, tmp_path: Path) -> None:
    """The script's metadata with one-number placeholder tensors (the real ones are 3.8 GB)."""
    path = tmp_path / "meta-7b.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    script.add_metadata(w, QT.Q4_0, 32, 4096, 11008, 32, 32, 32000)
    finish_with_placeholders(w)
    source = inspect_model(str(path))
    assert source.config == LLAMA2_7B
    assert source.metadata["tokenizer.ggml.model"] == "llama"
    assert source.metadata["tokenizer.ggml.bos_token_id"] == 1


@pytest.mark.parametrize(
    ("qtype", "output_qtype"),
    [(QT.Q4_0, QT.Q6_K), (QT.Q4_0, QT.Q4_0), (QT.Q8_0, QT.Q6_K), (QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q6_K)],
    ids=lambda q: q.name,
)
def test_tiny_file_loads_dense_and_int4_alike(
    script: ModuleType, tmp_path: Path, qtype: QT, output_qtype: QT
) -> None:
    path = script.write_gguf(tmp_path / "tiny.gguf", qtype, 2, output_qtype=output_qtype, **TINY)
    source = inspect_model(str(path))
    assert source.config == ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    matrices = Counter({qtype.name: 7 * 2 + 1}) + Counter({output_qtype.name: 1})  # + token_embd, output
    assert source.tensor_types == matrices + Counter({"F32": 2 * 2 + 1})
    exact, _ = load_model(str(path), dtype="float32", quantization="none")
    dense, _ = load_model(str(path), dtype="bfloat16", quantization="none")
    int4, _ = load_model(str(path), quantization="int4")
    expected = 4 * 2 + (output_qtype == QT.Q4_0) if qtype == QT.Q4_0 else 0  # wqkv, wo, w13, w2; output
    q4 = (GGUFLinear, Int4Linear)  # ours where they build, else torch's
    assert sum(isinstance(m, q4) for m in int4.modules()) == expected
    # A head that is not Q4 is requantized to int8 per row; other dense matrices stay bfloat16 (cast in
    # and out) while the activations and the KV cache are float32.
    assert isinstance(int4.output, q4 if output_qtype == QT.Q4_0 else Int8Linear)
    dense_linears = [m for m in int4.modules() if isinstance(m, CastLinear)]
    assert len(dense_linears) == (0 if qtype == QT.Q4_0 else 4 * 2)
    assert all(m.weight.dtype == torch.bfloat16 for m in dense_linears) and int4.dtype == torch.float32
    ref = forward_logits(exact, IDS)
    assert ref.abs().max() > 0.1  # the random weights give non-trivial logits
    assert rel_err(forward_logits(dense, IDS), ref) < 2e-2
    assert rel_err(forward_logits(int4, IDS), ref) < 2e-2
    if native.available():  # the default keeps every matrix in its file's type, on our kernels
        auto, _ = load_model(str(path))
        weights = [m.native_weight for m in auto.modules() if isinstance(m, GGUFLinear)]
        assert len(weights) == 4 * 2 + 1 and auto.output.native_weight.types() == [output_qtype.name]
        assert rel_err(forward_logits(auto, IDS), ref) < 2e-2


def test_tokenizer_loads_through_transformers(script: ModuleType, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMASERVE_CACHE", str(tmp_path / "cache"))
    path = script.write_gguf(tmp_path / "tiny.gguf", QT.Q4_0, 1, **TINY)
    ids = script.check_tokenizer(path)  # raises unless it round-trips with BOS 1 and EOS 2
    assert ids[0] == 1 and max(ids) < 512


def test_served_measurement_counts_every_token(script: ModuleType, tmp_path: Path, monkeypatch) -> None:
    """Our server started as the benchmark starts it (no flags but the model), driven over HTTP."""
    monkeypatch.setenv("LLAMASERVE_CACHE", str(tmp_path / "cache"))  # inherited by the server
    measure = load_benchmark("llama2_7b_measure")
    path = script.write_gguf(tmp_path / "tiny.gguf", QT.Q4_0, 2, output_qtype=QT.Q4_0, **TINY)
    result = measure.measure_server("ours", measure.llamaserve_cmd(path), streams=3, max_tokens=5,
                                    ttft_prompt="the quick brown fox " * 8)
    assert result["one_stream"]["tokens"] == 5 and result["3_streams"]["tokens"] == 15
    assert result["long_prompt_ttft_s"] > 0
    assert result["after_generate"]["peak_rss_gb"] >= result["after_load"]["rss_gb"] > 0
    row = measure.table_row(result, "tiny", 3)
    assert row.startswith("| ours | tiny |") and row.count("|") == 9


def test_alternated_rounds_time_both_servers_in_turn(script: ModuleType, tmp_path: Path, monkeypatch) -> None:
    """Two servers up at once (here two of ours), their decode alternated round by round; the table gives
    every round's ratio and the median of them."""
    monkeypatch.setenv("LLAMASERVE_CACHE", str(tmp_path / "cache"))
    measure = load_benchmark("llama2_7b_measure")
    path = script.write_gguf(tmp_path / "tiny.gguf", QT.Q4_0, 2, output_qtype=QT.Q4_0, **TINY)
    cmds = {"a": measure.llamaserve_cmd(path), "b": measure.llamaserve_cmd(path)}
    out = measure.alternate(cmds, streams=2, max_tokens=4, rounds=3)
    assert set(out) == {"a", "b"} and all(len(out[k][n]) == 3 for k in out for n in ("one", "many"))
    assert all(v > 0 for k in out for n in ("one", "many") for v in out[k][n])
    table = measure.alternate_table({"a": {"one": [2.0, 4.0, 3.0], "many": [8.0, 8.0, 8.0]},
                                     "b": {"one": [1.0, 4.0, 1.0], "many": [4.0, 2.0, 8.0]}}, 2)
    rows = table.splitlines()
    assert len(rows) == 2 + 3 + 1 and rows[2] == "| 1 | 2.0 | 1.0 | 2.00x | 8.0 | 4.0 | 2.00x |"
    assert rows[-1].endswith("| 3.00 | 1.00 | **2.00x** | 8.00 | 4.00 | **2.00x** |")  # medians of ratios


def test_alternate_needs_both_servers(script: ModuleType, tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"")
    argv = ["llama2_7b.py", "--out", str(path), "--reuse", "--measure", "--alternate", "3"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit):
        script.main()
    assert "--alternate" in capsys.readouterr().err
