"""Typed configuration: the model's shape and the engine's limits (validated with ValueError)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") or linear RoPE scaling; rope_type "default" means none."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r} (use linear or llama3)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "default"))
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return cls(rope_type=kind, **{k: d[k] for k in keys if k in d})

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """The shape of a llama-architecture model, in Hugging Face's vocabulary."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("model config: hidden_size is not divisible by num_attention_heads")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def num_parameters(self) -> int:
        h, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * layer + h + head

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json dict."""
        arch = d.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"unsupported architecture {arch!r}: llamaserve serves llama models only")
        heads = d["num_attention_heads"]
        # transformers >= 5 writes "rope_parameters" (theta and scaling together) instead of the two keys.
        rope = d.get("rope_parameters") or {}
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(d.get("rope_scaling") or rope),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' LlamaConfig accepts (used by the parity tests)."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Limits of the engine; CLI flags map onto these fields one to one."""

    block_size: int = 16
    kv_cache_memory: float = 0.0  # GB for the KV-cache pool; 0: auto (sized from the memory that is free)
    kv_cache_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 | int8
    max_num_seqs: int = 64  # cap on running sequences
    max_batch_tokens: int = 512  # per-step token budget; longer prompts are prefilled in chunks
    prefill_priority: bool = True  # new prompts get a step of their own before the running decodes
    max_model_len: int = 0  # 0: the model's context length
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    quantization: str = "auto"  # auto (GGUF types as they are) | none (exact, float32) | int4 | int8
    compile: bool = False  # torch.compile the forward, warmed up at start-up (slow first start)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not self.kv_cache_memory >= 0:  # (also refuses NaN)
            raise ValueError(f"kv_cache_memory must be > 0 GB, or 0 for auto; got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16", "int8"):
            raise ValueError("kv_cache_dtype must be auto, float32, bfloat16, float16 or int8, got "
                             f"{self.kv_cache_dtype!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_batch_tokens < self.block_size:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= block_size ({self.block_size})"
            )
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0, got {self.max_model_len}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in ("auto", "none", "int4", "int8"):
            raise ValueError(f"quantization must be auto, none, int4 or int8, got {self.quantization!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
