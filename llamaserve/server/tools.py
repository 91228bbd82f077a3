"""Tool calling: the prompt that offers the tools, the grammar that forces a call, the parser of calls.

Two formats. Native: a chat template that takes `tools` (Llama 3.x) renders them, and the model answers
with Llama 3's JSON, {"name": ..., "parameters": {...}} (calls joined by ";"). Generic, for templates
without tools (Llama 2, SmolLM2): a system message lists the tools and the model answers with
{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}. Either way the grammar allows only calls that
match a function's schema ("required", a named function) or text that does not start with "{" ("auto").
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llamaserve.engine.sampling_params import StructuredOutput
from llamaserve.engine.structured import close_objects
from llamaserve.server.protocol import ChatCompletionRequest, ChatMessage, DeltaFunctionCall, DeltaToolCall

_COMPACT = {"whitespace_flexible": False}
_CALL_HEAD = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"(?:arguments|parameters)":')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolPlan:
    """What a chat request asked of its tools, and in which format the model writes calls."""

    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}} objects
    choice: str  # "auto", "required" or the one function's name
    parallel: bool
    native: bool

    @property
    def args_key(self) -> str:
        return "parameters" if self.native else "arguments"

    def grammar(self) -> StructuredOutput:
        names = [t["function"]["name"] for t in self.tools]
        named = self.choice not in ("auto", "required")
        call = {"anyOf": [self._call_schema(name) for name in ([self.choice] if named else names)]}
        several = self.parallel and not named  # a named function is called once, as OpenAI does
        if self.native:
            calls = "%json " + json.dumps({"x-guidance": _COMPACT} | call)
            body = f"call: {calls}\ncalls: call" + (' (";" call)*' if several else "")
        else:
            array: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
            if not several:
                array["maxItems"] = 1
            schema = {"x-guidance": _COMPACT, "type": "object", "properties": {"tool_calls": array},
                      "required": ["tool_calls"], "additionalProperties": False}
            body = "calls: %json " + json.dumps(schema)
        start = "start: TEXT | calls\nTEXT: /[^{](.|\\n)*/\n" if self.choice == "auto" else "start: calls\n"
        return StructuredOutput("grammar", start + body)

    def _call_schema(self, name: str) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        params = close_objects(fn.get("parameters") or {"type": "object"})
        return {"type": "object", "properties": {"name": {"const": name}, self.args_key: params},
                "required": ["name", self.args_key], "additionalProperties": False}

    def system_prompt(self) -> str:
        """The generic format's instructions (native templates render the tools themselves)."""
        listed = json.dumps([{"name": f["name"], "description": f.get("description", ""),
                              "parameters": f.get("parameters") or {"type": "object"}}
                             for f in (t["function"] for t in self.tools)])
        must = {"auto": "Call them when they help; otherwise answer in plain text.",
                "required": "You must call at least one of them."}
        return (f"You can call these functions: {listed}\n"
                f"{must.get(self.choice, f'You must call {self.choice}.')} To call functions, reply with "
                'only this JSON: {"tool_calls": [{"name": "<function>", "arguments": {<its arguments>}}]}')


def plan_tools(req: ChatCompletionRequest, template: str | None) -> ToolPlan | None:
    """None when the request offers no tools or forbids calling them; ValueError for a bad combination."""
    choice = req.tool_choice
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise ValueError("tools: function names must be unique")
    if not names:
        if choice not in (None, "none"):
            raise ValueError("tool_choice needs 'tools'")
        return None
    if choice == "none":
        return None
    name = "auto" if choice is None else choice if isinstance(choice, str) else choice.function.name
    if name not in ("auto", "required") and name not in names:
        raise ValueError(f"tool_choice names function {name!r}, which is not in 'tools'")
    if req.response_format is not None and req.response_format.type != "text" or req.structured() is not None:
        raise ValueError("response_format or structured_outputs cannot be combined with tools unless "
                         "tool_choice is 'none'")
    native = template is not None and "tools" in template
    return ToolPlan([t.model_dump(exclude_none=True) for t in req.tools or []], name,
                    req.parallel_tool_calls is not False, native)


def chat_messages(req: ChatCompletionRequest, plan: ToolPlan | None, template: str | None) -> list[dict]:
    """The messages as the chat template takes them, with tool calls and results in the model's format."""
    native = template is not None and "tools" in template
    out: list[dict[str, Any]] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        entry: dict[str, Any] = {"role": role, "content": m.text()} | ({"name": m.name} if m.name else {})
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                     for c in m.tool_calls]
            if native:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": f}
                                       for c, f in zip(m.tool_calls, calls, strict=True)]
            else:
                entry["content"] = (entry["content"] + "\n" if entry["content"] else "") + json.dumps(
                    {"tool_calls": calls})
        if role == "tool":
            if native:
                entry |= {"tool_call_id": m.tool_call_id} if m.tool_call_id else {}
            else:
                entry = {"role": "user", "content": f"Function result ({_call_name(req.messages, m)}): "
                                                    f"{entry['content']}"}
        out.append(entry)
    if plan is not None and not plan.native:
        if out and out[0]["role"] == "system":
            out[0] = out[0] | {"content": out[0]["content"] + "\n\n" + plan.system_prompt()}
        else:
            out.insert(0, {"role": "system", "content": plan.system_prompt()})
    return out


def _arguments(text: str) -> Any:
    """A past call's arguments for the template: parsed JSON; {} for none; else the text as it was (as
    for OpenAI, the field is an opaque string: a history is replayed, not judged)."""
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _call_name(messages: list[ChatMessage], result: ChatMessage) -> str:
    for m in messages:
        for c in m.tool_calls or []:
            if c.id == result.tool_call_id:
                return c.function.name
    return result.tool_call_id or "unknown call"


@dataclass(slots=True)
class ToolCallParser:
    """Splits one choice's text stream into content and tool-call deltas, as the text arrives.

    The grammar makes calls compact JSON in a fixed key order, so a call's head is
    {"name":"X","arguments": and its arguments are the one JSON value that follows.
    """

    native: bool
    mode: str = "start"  # "start" -> "text" or "calls"
    stack: list[str] = field(default_factory=list)  # open brackets of the calls' JSON
    in_string: bool = False
    escaped: bool = False
    call_depth: int = 0  # len(stack) inside a call object
    head: str = ""  # the current call's text until its arguments start
    in_args: bool = False
    num_calls: int = 0

    def __post_init__(self) -> None:
        self.call_depth = 1 if self.native else 3  # {"tool_calls":[{ ...

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        """(content delta, tool-call deltas) for the next piece of text."""
        if self.mode == "start" and text:  # the grammar starts calls with "{" and text with anything else
            self.mode = "calls" if text.startswith("{") else "text"
        if self.mode == "text":
            return text, []
        deltas: list[DeltaToolCall] = []
        args = ""
        for ch in text:
            args = self._char(ch, args, deltas)
        if args:
            deltas.append(DeltaToolCall(index=self.num_calls - 1, function=DeltaFunctionCall(arguments=args)))
        return "", deltas

    def _char(self, ch: str, args: str, deltas: list[DeltaToolCall]) -> str:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.stack.append(ch)
        elif ch in "}]":
            if len(self.stack) == self.call_depth and self.in_args:  # the call object closes
                self.stack.pop()
                self.in_args = False
                return args
            self.stack.pop() if self.stack else None
        if self.in_args:
            return args + ch
        if len(self.stack) >= self.call_depth:
            self.head += ch
            match = _CALL_HEAD.fullmatch(self.head)
            if match:
                if args:
                    deltas.append(DeltaToolCall(index=self.num_calls - 1,
                                                function=DeltaFunctionCall(arguments=args)))
                self.num_calls += 1
                deltas.append(DeltaToolCall(index=self.num_calls - 1, id=new_call_id(), type="function",
                                            function=DeltaFunctionCall(name=json.loads(match.group(1)),
                                                                       arguments="")))
                self.head, self.in_args = "", True
                return ""
        return args
