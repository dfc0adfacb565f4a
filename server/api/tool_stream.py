"""ToolOutput: a chat choice's generated text as an OpenAI assistant message (content and/or tool_calls), whole
(``message``) or as stream deltas (``stream()`` -> ToolStream.feed per increment). See server.api.tools."""
from __future__ import annotations

from server.api.tools import HermesParser, NamedToolChoice, ParsedCall, call_dicts, new_call_id, parse_required


class ToolOutput:
    def __init__(self, mode: str | None, choice, parallel: bool = True) -> None:
        self.mode = mode  # None (no tools) | "none" | "auto" | "required" | "named"
        self.name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        self.parallel = parallel  # parallel_tool_calls; false: one call at most (required: its grammar's maxItems)
        self.parser = HermesParser()

    def calls(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished choice's text."""
        if self.mode == "named":
            return None, [ParsedCall(self.name, text)]
        if self.mode == "required":
            calls = parse_required(text) if finish_reason == "stop" else None
            return (None, calls) if calls else (text, [])
        if self.mode == "auto":
            content, calls = self.parser.parse(text)
            return content, calls if self.parallel else calls[:1]  # vLLM keeps the first
        return text, []

    def finish_reason(self, calls: list[ParsedCall], finish_reason: str | None) -> str | None:
        """"tool_calls" when calls were made (a forced function keeps "stop", as OpenAI)."""
        if calls and finish_reason == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return finish_reason

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        content, calls = self.calls(text, finish_reason)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = call_dicts(calls)
        elif self.mode is not None:
            message["tool_calls"] = []
        return message, self.finish_reason(calls, finish_reason)

    def stream(self) -> "ToolStream":
        return ToolStream(self)


class ToolStream:
    """One streamed choice: plain text passes through; a named function's arguments stream as they come; the
    calls of ``required`` and ``auto`` (after any text before them) go out whole when the choice finishes."""

    def __init__(self, output: ToolOutput) -> None:
        self.output = output
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of ``text`` sent as content (or, named, as arguments)
        self.call_id = new_call_id()
        self.named_started = False

    def feed(self, text: str, finish_reason: str | None, new_tokens: bool = False) -> tuple[dict, str | None]:
        """(delta, finish_reason) for the next increment; the delta may be empty. Plain text: an increment of new
        tokens whose text is held back (half of a multi-byte character) is still a chunk, with empty content, as
        vLLM sends it: a client timing tokens by chunks would otherwise see two tokens' gap and then two at once."""
        self.text += text
        mode = self.output.mode
        if mode == "named":
            return self._named(text), finish_reason
        if mode not in ("auto", "required"):
            return ({"content": text} if text or new_tokens else {}), finish_reason
        if finish_reason is None:
            return self._content_so_far(), None
        _, calls = self.output.calls(self.text, finish_reason)
        delta = {}
        if calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(call_dicts(calls))]
            cut = self.text.find(HermesParser.START) if mode == "auto" else self.sent
            rest = self.text[self.sent:max(cut, self.sent)]
        else:
            rest = self.text[self.sent:]
        if rest:
            delta["content"] = rest
        return delta, self.output.finish_reason(calls, finish_reason)

    def _named(self, text: str) -> dict:
        if not self.named_started:
            self.named_started = True
            return {"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                    "function": {"name": self.output.name, "arguments": text}}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}

    def _content_so_far(self) -> dict:
        """auto: the text before any <tool_call> (less a tail that may start one); required: nothing yet."""
        if self.output.mode != "auto":
            return {}
        safe = self.output.parser.safe_prefix(self.text)
        if safe <= self.sent:
            return {}
        out, self.sent = self.text[self.sent:safe], safe
        return {"content": out}
