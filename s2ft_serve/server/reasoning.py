"""Reasoning in chat answers: `<think>…</think>` apart from the answer (vLLM's `--reasoning-parser`).

Models that think first (Qwen3, DeepSeek-R1 and their distillations) write their reasoning between
`<think>` and `</think>`, then the answer. With a reasoning parser the server returns the reasoning
as `reasoning_content` (DeepSeek's and vLLM's field) and only the answer as `content`, streamed or
not; the answer alone then goes on to the tool-call parser, if any.

- `qwen3`: the reasoning is a `<think>` block at the very start of the answer (after whitespace);
  an answer that does not start with one has none (thinking disabled).
- `deepseek_r1`: the answer starts in reasoning even without `<think>` (the chat template opens it
  in the prompt), up to `</think>`.

Either way an unclosed block (cut short by `max_tokens`) is all reasoning, and the whitespace
between `</think>` and the answer is dropped. A guide (structured output, a forced tool call)
constrains the whole answer, so a guided answer is read as `qwen3` reads it: it has reasoning only if
its grammar lets it start with a `<think>` block.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thought:
    """A piece of reasoning (the rest of an answer's pieces are plain text)."""

    text: str


class ThinkSplitter:
    """Splits an answer, as it streams, into `Thought`s and answer text; text is passed on as soon as
    it cannot be the start of a tag."""

    START, END = "<think>", "</think>"

    def __init__(self, parser: str):
        self.opens_itself = parser == "deepseek_r1"  # reasoning first, even without <think>
        self.state = "start"  # "start": nothing but whitespace or part of <think> yet; "thinking"; "answer"
        self.held = ""
        self.after_end = False  # drop the whitespace that follows </think>

    def feed(self, text: str) -> list[str | Thought]:
        self.held += text
        out: list[str | Thought] = []
        while True:
            if self.state == "start":
                head = self.held.lstrip()
                if head.startswith(self.START):
                    self.held, self.state = head[len(self.START):], "thinking"
                elif head and not self.START.startswith(head):
                    self.state = "thinking" if self.opens_itself else "answer"
                else:
                    return out  # undecided
            elif self.state == "thinking":
                end = self.held.find(self.END)
                if end >= 0:
                    out += [Thought(self.held[:end])] if end else []
                    self.held, self.state, self.after_end = self.held[end + len(self.END):], "answer", True
                    continue
                cut = len(self.held) - partial_tag(self.held, self.END)
                out += [Thought(self.held[:cut])] if cut else []
                self.held = self.held[cut:]
                return out
            else:
                if self.after_end:
                    self.held = self.held.lstrip()
                    self.after_end = not self.held
                out += [self.held] if self.held else []
                self.held = ""
                return out

    def finish(self) -> list[str | Thought]:
        held, self.held = self.held, ""
        if not held:
            return []
        if self.state == "thinking":
            return [Thought(held)]  # an unclosed block: all reasoning
        if self.state == "start" and self.opens_itself and held.strip():
            return [Thought(held)]
        return [held]


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)
