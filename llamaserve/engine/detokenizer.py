"""Incremental detokenization: token ids in, text deltas out, with stop strings matched across tokens."""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"  # what a decoder writes for an unfinished (or invalid) UTF-8 sequence
_PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the output so its first token gets its leading space
_MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 byte tokens


class IncrementalDetokenizer:
    """Decode one sequence's output a few tokens at a time, as vLLM does.

    Each step decodes only a short window of tokens: ids[prefix:read] were already turned into text and
    are decoded again only as context, so that decode(ids[prefix:]) minus decode(ids[prefix:read]) is the
    new text with the right leading space (SentencePiece) and whole characters (byte tokens).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        self._include_stop = include_stop_str_in_output
        # A stop string may still be completed by the next token while its first len - 1 chars are held.
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        # Invariant: ids[prefix:read] decode to text already produced; ids[read:] have produced none yet.
        self._ids: list[int] = list(prompt_token_ids[self._context_start(prompt_token_ids) :])
        self._prefix = 0
        self._read = self._context_end(self._ids)
        self._prefix_text: str | None = None  # cached decode(ids[prefix:read])
        self._pending = ""  # decoded output text not yet returned (the stop-string hold-back)
        self.stop_reason: str | None = None

    def add(self, token_ids: list[int]) -> str:
        """Take newly generated tokens; return the text they complete (may be empty)."""
        if self.stop_reason is not None:
            return ""
        self._ids.extend(token_ids)
        self._pending += self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """Return all text still held back (call once the sequence has finished without a stop string)."""
        if self.stop_reason is not None:
            return ""
        self._pending += self._decode_window(final=True)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _context_start(self, prompt_token_ids: list[int]) -> int:
        """Where the prompt context starts: a few tokens back, and not inside a multi-token character."""
        start = max(len(prompt_token_ids) - _PROMPT_CONTEXT, 0)
        # Starting mid-character would decode to U+FFFD, and a byte-fallback decoder turns a whole run of
        # byte tokens into U+FFFDs when it starts mid-character, so step back to a character boundary.
        for _ in range(_MAX_CHAR_TOKENS):
            if start == 0 or not self._decode(prompt_token_ids[start:]).startswith(_REPLACEMENT):
                break
            start -= 1
        return start

    def _context_end(self, context: list[int]) -> int:
        """Where the prompt's text ends: before a character the prompt leaves unfinished, if any."""
        end = len(context)
        # That character's tokens are decoded again with the output, so the character is not lost.
        for _ in range(_MAX_CHAR_TOKENS):
            if end == 0 or not self._decode(context[:end]).endswith(_REPLACEMENT):
                break
            end -= 1
        return end

    def _decode_window(self, final: bool) -> str:
        """New text of ids[read:]; empty while it would end in an unfinished character (unless final)."""
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        # Shorter or equal text: only skipped special tokens so far. A trailing U+FFFD: the next token
        # should finish the character, so wait for it (a flush at the end gives up waiting).
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        delta = text[len(self._prefix_text) :]
        # Slide the window: the tokens just decoded become the context for the next ones.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = None
        return delta

    def _release(self, final: bool) -> str:
        """Return pending text up to a stop string, or all but the hold-back when none has appeared."""
        hit = self._find_stop(self._pending)
        if hit is not None:
            index, stop = hit
            self.stop_reason = stop
            text = self._pending[: index + len(stop)] if self._include_stop else self._pending[:index]
            self._pending = ""
            return text
        keep = 0 if final else self._holdback
        cut = max(len(self._pending) - keep, 0)
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in text (first listed wins a tie), as (index, stop string)."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = text.find(stop)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best
