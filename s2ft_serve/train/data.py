"""Training data: JSONL files in the OpenAI fine-tuning formats, tokenized with loss masks.

Each non-blank line is one JSON object in one of three shapes:
  {"prompt": str, "completion": str}      loss on the completion only
  {"messages": [{"role", "content"}...]}  the tokenizer's chat template; loss on assistant turns
  {"text": str}                           plain language modelling; loss on every token
The whole file is validated before training starts; the first malformed line raises
`DataValidationError` with its line number and the reason.

Batches are built either by padding (one example per row, right-padded to the longest row)
or by packing (examples concatenated and cut into rows of exactly `max_length`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from s2ft_serve.adapters.format import is_utf8
from s2ft_serve.errors import DataValidationError
from s2ft_serve.model.loading import TEMPLATE_FAILURES, TEMPLATE_REFUSALS
from s2ft_serve.train.config import EPOCH_SEED_STRIDE

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Parse and validate every line; return `(line number, record)` pairs."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"{path}: no such data file")
    records: list[tuple[int, dict]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataValidationError(f"{path}:{lineno}: not UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataValidationError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:  # QA: a line of 100,000 nested arrays was a traceback
                raise DataValidationError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
            except ValueError as exc:  # a number Python refuses to read, such as one of over 4300 digits
                raise DataValidationError(f"{path}:{lineno}: invalid JSON ({exc})") from None
            reason = record_problem(record)
            if reason:
                raise DataValidationError(f"{path}:{lineno}: {reason}")
            records.append((lineno, record))
    if not records:
        raise DataValidationError(f"{path}: holds no examples")
    return records


def _not_text(where: str, text: str) -> str | None:
    """JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer takes (QA: it passed the
    validation, then failed after the model loaded, with a traceback)."""
    if is_utf8(text):
        return None
    return f"{where} is not valid Unicode text (it holds a lone surrogate, such as the escape \\ud800)"


def record_problem(record: object) -> str | None:
    """Why `record` is not a valid example, or None."""
    if not isinstance(record, dict):
        return f"each line must be a JSON object, got {type(record).__name__}"
    if "messages" in record:
        return _messages_problem(record["messages"])
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return f"'{key}' must be a string (prompt/completion format)"
            if problem := _not_text(key, record[key]):
                return problem
        if not record["completion"]:
            return "'completion' is empty"
        return None
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            return "'text' must be a non-empty string"
        return _not_text("text", record["text"])
    return "expected one of the keys 'messages', 'prompt' + 'completion', or 'text'"


def _messages_problem(messages: object) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}].content must be a string"
        if problem := _not_text(f"messages[{i}].content", m["content"]):
            return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "'messages' has no assistant message to learn from"
    return None


def tokenize_record(record: dict, tokenizer, max_length: int) -> Example:
    """Token ids and labels for one validated record, truncated to `max_length`."""
    if "messages" in record:
        ids, labels = _tokenize_messages(record["messages"], tokenizer)
    elif "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        completion = completion_ids(tokenizer, prompt, record["prompt"], record["completion"]) + _eos(tokenizer)
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    else:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"] + _eos(tokenizer)
        labels = list(ids)
    return Example(input_ids=ids[:max_length], labels=labels[:max_length])


def completion_ids(tokenizer, prompt_ids: list[int], prompt: str, completion: str) -> list[int]:
    """The tokens that follow `prompt_ids` to write `completion`, as TRL's SFTTrainer finds them: the
    joint text's tokens after the prompt's, where the prompt's tokens are its prefix. Tokenized alone, a
    completion starts a text: SentencePiece tokenizers (Llama 2, Mistral) then put a word-start "▁" in
    front of it (QA: "Answer:" + "\n4" was learnt, and answered, as " \n4"). Where the join changes the
    prompt's last tokens, the completion is tokenized after a "\n", whose tokens are dropped."""
    joint = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    anchor = tokenizer("\n", add_special_tokens=False)["input_ids"]
    anchored = tokenizer("\n" + completion, add_special_tokens=False)["input_ids"]
    if anchor and anchored[: len(anchor)] == anchor:
        return anchored[len(anchor):]
    return tokenizer(completion, add_special_tokens=False)["input_ids"]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _render(tokenizer, messages: list[dict], **kwargs):
    """The chat template's rendering; a template that refuses the conversation (roles that must
    alternate...), or no template at all, is a DataValidationError (QA: a traceback with no FILE:LINE)."""
    if hasattr(tokenizer, "chat_template") and not tokenizer.chat_template:
        raise DataValidationError("the base model's tokenizer has no chat template: use the prompt/completion "
                                  "or text format")
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TEMPLATE_REFUSALS as exc:
        raise DataValidationError(f"the chat template refused this conversation: {exc}") from None
    except TEMPLATE_FAILURES as exc:
        raise DataValidationError(f"the chat template failed on this conversation: {type(exc).__name__}: "
                                  f"{exc}") from None


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = _render(tokenizer, messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _opening_prompt_ids(tokenizer, first: dict) -> list[int]:
    """What the template renders before the content of an assistant turn that opens the conversation.

    Chat libraries refuse to render an empty history, and templates such as SmolLM2's inject their
    default system prompt only while rendering the first message, so the prompt is read off the
    rendering of that first turn itself: the text before a sentinel put in place of its content.
    """
    sentinel = "[[s2ft-train: assistant content]]"  # text no template emits on its own
    text = _render(tokenizer, [{**first, "content": sentinel}], tokenize=False, add_generation_prompt=False)
    if not isinstance(text, str) or sentinel not in text:
        raise DataValidationError(
            "the tokenizer's chat template does not render an opening assistant message's content verbatim, so "
            "its tokens cannot be masked exactly; start the conversation with a user turn or use the "
            "prompt/completion format instead")
    return list(tokenizer(text[: text.index(sentinel)], add_special_tokens=False)["input_ids"])


def _tokenize_messages(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Apply the chat template; label the tokens each assistant turn adds after its prompt."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = _chat_ids(tokenizer, msgs, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i:
            prefix = _chat_ids(tokenizer, msgs[:i], add_generation_prompt=True)
        else:
            prefix = _opening_prompt_ids(tokenizer, m)
        upto = _chat_ids(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if ids[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise DataValidationError(
                "the tokenizer's chat template does not render this conversation turn by turn (an earlier "
                "turn changes when later ones are added), so assistant tokens cannot be masked exactly; "
                "use the prompt/completion format instead")
        labels[len(prefix): len(upto)] = ids[len(prefix): len(upto)]
    return ids, labels


def load_examples(path: str | Path, tokenizer, max_length: int) -> list[Example]:
    """Validate the whole file, then tokenize it; examples with no loss token are refused."""
    return tokenize_records(path, read_records(path), tokenizer, max_length)


def tokenize_records(path: str | Path, records: list[tuple[int, dict]], tokenizer, max_length: int) -> list[Example]:
    """Tokenize the `(line number, record)` pairs `read_records(path)` returned; examples with no loss
    token are refused. Apart from `load_examples` so that a file is checked once, before the model loads."""
    examples = []
    for lineno, record in records:
        try:
            ex = tokenize_record(record, tokenizer, max_length)
        except DataValidationError as exc:
            raise DataValidationError(f"{path}:{lineno}: {exc.message}") from None
        if all(label == IGNORE for label in ex.labels[1:]):
            raise DataValidationError(
                f"{path}:{lineno}: no completion / assistant token is left within max_length={max_length}")
        examples.append(ex)
    return examples


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate all examples and cut the stream into rows of `max_length` (the tail is kept)."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]  # never predict an example's first token from the previous one
    rows = [Example(ids[i: i + max_length], labels[i: i + max_length]) for i in range(0, len(ids), max_length)]
    return [r for r in rows if len(r.input_ids) > 1 and any(x != IGNORE for x in r.labels[1:])]


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a collated batch's loss averages over: labelled positions after the first (the loss
    predicts token t + 1 from t)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def collate(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `rows` into `input_ids`, `attention_mask` and `labels` `[batch, longest]`."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(num_rows: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """The row indices of each batch of one epoch, a pure function of (epoch, seed)."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
        order = torch.randperm(num_rows, generator=generator).tolist()
    else:
        order = list(range(num_rows))
    return [order[i: i + batch_size] for i in range(0, num_rows, batch_size)]
