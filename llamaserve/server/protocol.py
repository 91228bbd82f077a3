"""Pydantic models of what the routes take and return: OpenAI's chat and completions, /predict, tokenizing."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from llamaserve.engine.sampling_params import SamplingParams, StructuredOutput


class _Request(BaseModel):
    # A field we do not know is refused (400 naming it), never quietly ignored; types are strict
    # (max_tokens: true is not 1, stream: "yes" is not true; 16.0 is 16, as JSON Schema has it).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, data: Any) -> Any:
        _check_text(data)
        return _integral(data)


def _integral(value: Any) -> Any:
    """1.0 is an integer to JSON Schema, as to JSON: an integer field takes it (2.5 is still refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


StrictRequest = _Request  # the base of every API's request models


def _check_text(value: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"); that is no text, and tokenizers reject it."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode: a lone surrogate (\\ud800-\\udfff) is not "
                             "text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)


def _refuse(data: Any, fields: dict[str, tuple[Any, ...]]) -> Any:
    """400 for an OpenAI field we do not honour, unless it holds one of the values that change nothing.

    Run before field validation, so the message names the field; the fields' types admit only those
    values, so the schema says the same as the server."""
    if isinstance(data, dict):
        for name, harmless in fields.items():
            value = data.get(name)
            if value is not None and not any(value == h and type(value) is type(h) for h in harmless):
                raise ValueError(f"'{name}' is not supported by this server")
    return data


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: Literal[False] | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` (exactly one of its fields)."""

    json_: dict[str, Any] | Annotated[str, Field(min_length=1)] | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, min_length=1)
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = Field(default=None, min_length=1)
    json_object: bool | None = None


class _Sampling(_Request):
    """Fields shared by chat, completions and /predict; None means 'the default'."""

    # The ranges SamplingParams.validate checks, stated here so that the schema says them too.
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=16)] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]+$")],
                     Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, json_schema_extra={"propertyNames": {"pattern": r"^[0-9]+$"}})
    user: str | None = None  # an end-user id: accepted, and nothing to honour here
    # vLLM's extras, which many clients already send
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    structured_outputs: StructuredOutputs | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)  # vLLM's: a private cache
    guided_json: dict[str, Any] | Annotated[str, Field(min_length=1)] | None = None  # vLLM's older names
    guided_regex: str | None = Field(default=None, min_length=1)
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = Field(default=None, min_length=1)

    def structured(self) -> StructuredOutput | None:
        """The output constraint asked for through vLLM's fields (at most one)."""
        s = self.structured_outputs or StructuredOutputs()
        found = [("json", s.json_), ("regex", s.regex), ("choice", s.choice), ("grammar", s.grammar),
                 ("json", {"type": "object"} if s.json_object else None), ("json", self.guided_json),
                 ("regex", self.guided_regex), ("choice", self.guided_choice),
                 ("grammar", self.guided_grammar)]
        given = [(kind, value) for kind, value in found if value is not None]
        if len(given) > 1:
            raise ValueError("give one structured output constraint, not several")
        if not given:
            return None
        kind, value = given[0]
        return StructuredOutput(kind, value if isinstance(value, str) and kind != "choice" else
                                json.dumps(value))

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutput | None = None,
                        default_temperature: float = 1.0) -> SamplingParams:
        """Map onto SamplingParams (which raises ValueError with a message for bad values)."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = float(value)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=bias,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            structured=structured or self.structured(),
            cache_salt=self.cache_salt,
        )


# -- chat: messages, tools, response formats ------------------------------------------------------
class ContentPart(_Request):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content part of type {data.get('type')!r} is not supported (text only)")
        return data


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # which call a tool message answers
    refusal: str | None = None  # an SDK's assistant message sent back as history carries these
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the schema here: strict or not


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the grammar enforces the schema either way


class ResponseFormat(_Request):
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json", '{"type": "object"}')
        if self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a 'json_schema' object")
        return StructuredOutput("json", json.dumps(self.json_schema.schema_ or {"type": "object"}))


class ChatCompletionRequest(_Sampling):
    # The schema says what plan_tools checks: a tool_choice other than "none" needs tools.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": [None, "none"]}}}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}})

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    continue_final_message: bool = False  # vLLM's: continue the last (assistant) message, a prefill
    # OpenAI's, accepted where their value changes nothing here, refused otherwise
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = None  # OpenAI keeps it only with store: nothing to keep here
    service_tier: Literal["auto", "default"] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    modalities: list[Literal["text"]] | None = Field(default=None, min_length=1, max_length=1)
    audio: None = None
    prediction: None = None
    web_search_options: None = None
    functions: None = None
    function_call: None = None
    reasoning_effort: None = None
    verbosity: None = None

    @model_validator(mode="before")
    @classmethod
    def _honoured_only(cls, data: Any) -> Any:
        return _refuse(data, {"store": (False,), "service_tier": ("auto", "default"),
                              "modalities": (["text"],), "audio": (), "prediction": (),
                              "web_search_options": (), "functions": (), "function_call": (),
                              "reasoning_effort": (), "verbosity": ()})


def chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """Another API's request translated into a chat request; what does not validate is one line."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ValueError(f"{where}: {first.get('msg', 'invalid')}".removeprefix(": ")) from None


class CompletionRequest(_Sampling):
    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | \
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None

    @model_validator(mode="before")
    @classmethod
    def _honoured_only(cls, data: Any) -> Any:
        return _refuse(data, {"suffix": ("",), "best_of": (1,)})


class PredictRequest(_Sampling):
    # The schema says what the route checks: a non-empty prompt or query.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string", "minLength": 1}}},
        {"required": ["query"], "properties": {"query": {"type": "string", "minLength": 1}}}]})

    prompt: str | None = None
    query: str | None = None  # the original project's clients also send "query"
    system: str | None = None
    raw: bool = False  # true: no chat template, the prompt goes to the model as it is
    max_tokens: int | None = Field(default=256, ge=1)


class TokenizeRequest(_Request):
    # The schema says what the route checks: a prompt or some messages.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# -- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


def usage(prompt: int, completion: int, cached: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details={"cached_tokens": cached})


class _Response(BaseModel):
    id: str
    created: int
    model: str


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class _Sparse(BaseModel):
    """Serialized without its None fields, as OpenAI's stream deltas are."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class PredictResponse(BaseModel):
    id: str
    response: str
    finish_reason: str | None
    usage: Usage


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                         415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"),
                                       "message": message}}


def error_for_path(path: str, status: int, message: str, type_: str, param: str | None = None,
                   code: Any = None) -> dict[str, Any]:
    """The error in the shape of the API the path belongs to: Anthropic's on /v1/messages, Ollama's on
    /api/, OpenAI's everywhere else."""
    if path.startswith("/v1/messages"):
        return anthropic_error(status, message)
    if path.startswith("/api/"):
        return {"error": message}
    return error_body(message, type_, param, code)
