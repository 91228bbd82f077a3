"""POST /v1/embeddings (OpenAI's shape); Ollama's /api/embed uses the same `embed_texts`.

Embeddings come from the model's final hidden states, pooled ("mean" by default, or "last":
--embedding-pooling) and L2-normalised, computed on the engine thread between generation steps (prefill
only, no KV cache kept). An input longer than the context is refused, never truncated.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from llamaserve.server.protocol import StrictRequest, usage
from llamaserve.server.routes import encode_text, state_of
from llamaserve.server.serving import ClientDisconnected, new_id, unless_disconnected

router = APIRouter()

MAX_INPUTS = 2048  # OpenAI's own bound on inputs per request

Text = Annotated[str, Field(min_length=1)]
Ids = Annotated[list[int], Field(min_length=1)]


class EmbeddingRequest(StrictRequest):
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | Ids | \
        Annotated[list[Ids], Field(min_length=1, max_length=MAX_INPUTS)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None  # no model here is trained for shortened embeddings: refused
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_dimensions(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dimensions") is not None:
            raise ValueError("'dimensions' is not supported: embeddings have the model's hidden size")
        return data


async def embed_texts(request: Request,
                      inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
    """(embeddings, prompt tokens) of texts or token-id lists, through the engine's admission."""
    state = state_of(request)
    engine = state.ready_engine()
    if inputs and isinstance(inputs[0], str):  # the size check and tokenizing off the loop, as for chat
        prompts = [await encode_text(engine, t) for t in inputs]  # type: ignore[arg-type]
    else:
        prompts = [list(p) for p in inputs]  # type: ignore[arg-type]
    vectors = await unless_disconnected(request, engine.embed(prompts, state.settings.embedding_pooling,
                                                               state.settings.max_queue))
    return vectors, sum(len(p) for p in prompts)


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> dict[str, Any]:
    state = state_of(request)
    state.check_model(req.model)
    inputs: Any = [req.input] if isinstance(req.input, str) or isinstance(req.input[0], int) else req.input
    try:
        vectors, tokens = await embed_texts(request, inputs)
    except ClientDisconnected:
        return {}
    data = []
    for i, v in enumerate(vectors):
        value: Any = v if req.encoding_format == "float" else base64.b64encode(
            np.asarray(v, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    request.state.run_info = {"id": new_id("embd"), "prompt_tokens": tokens, "completion_tokens": 0,
                              "ttft": None}
    u = usage(tokens, 0)
    return {"object": "list", "model": state.model_name, "data": data,
            "usage": {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens}}
