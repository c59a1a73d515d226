"""Training data: JSONL records -> token ids with loss labels -> packed blocks or length-grouped batches.

Three record formats, one JSON object per line (blank lines are skipped):

- ``{"text": ...}``: loss on every token; an EOS is appended so the model learns to stop.
- ``{"prompt": ..., "completion": ...}``: loss on the completion (and its appended EOS) only; the
  prompt's labels are ``IGNORE`` (-100). The two parts are tokenized separately, as TRL does.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template (jinja2, sandboxed), tokenized without added special tokens, exactly as transformers'
  ``apply_chat_template(tokenize=True)``. Loss on the assistant turns: turn i spans the text between
  ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``. Where those
  renderings are not prefixes of the whole conversation (a template that rewrites earlier turns) or
  there is no assistant turn, the loss is on the whole rendered conversation and the record is
  counted in :attr:`DataStats.whole_chat_loss`. No EOS is appended: the template marks turn ends.

Labels are aligned with the ids (``labels[i]`` is ``ids[i]`` or ``IGNORE``); the loss shifts them.
Packing concatenates the examples into one stream and cuts it into ``seq_len`` blocks (the last one
padded); attention crosses example boundaries, as in GPT-2-style pretraining, with the EOS between
them. Without packing each example is truncated to ``seq_len`` (counted) and batches are formed from
length-sorted examples, so that padding is small.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from adaptertool.errors import InputError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

__all__ = [
    "IGNORE", "Batch", "ChatTemplate", "DataStats", "Dataset", "Example", "Record", "TextTokenizer",
    "build_dataset", "epoch_order", "parse_records", "tokenize_records",
]

IGNORE = -100  # label of a token the loss skips (torch cross_entropy's default ignore_index)


@dataclass(frozen=True)
class Record:
    """One JSONL line: ``kind`` is "text", "completion" or "chat"; ``line`` is 1-based."""

    line: int
    kind: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Example:
    ids: list[int]
    labels: list[int]  # ids[i] or IGNORE, aligned with ids


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss
    attention_mask: torch.Tensor | None  # (B, T) bool, True = real token; None: no padding

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens."""
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    @property
    def targets(self) -> int:
        """Tokens the loss predicts: label positions 1.. that are not IGNORE."""
        return int((self.labels[:, 1:] != IGNORE).sum())


@dataclass(frozen=True, kw_only=True)
class DataStats:
    records: int
    tokens: int  # after truncation, before padding
    target_tokens: int
    truncated: int = 0  # examples cut to seq_len (no packing)
    truncated_tokens: int = 0
    dropped: int = 0  # examples left with no target token after truncation (no packing)
    whole_chat_loss: int = 0  # conversations trained on whole (no assistant turn or non-prefix template)
    batches: int = 0


@dataclass(frozen=True)
class Dataset:
    batches: list[Batch]
    stats: DataStats


def parse_records(lines: Iterable[str], *, source: str) -> list[Record]:
    """Parse JSONL text lines into records, checking each line's shape.

    Raises:
        AdapterToolError: ``"{source}:{line}: ..."`` for the first malformed line, or no record at all.
    """
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{source}:{number}: not valid JSON ({err.msg}, column {err.colno}); "
                             "each line must be one JSON object") from err
        records.append(Record(number, _kind(obj, f"{source}:{number}"), obj))
    if not records:
        raise InputError(f"{source}: holds no records; expected JSON lines with text, prompt/completion or messages")
    return records


def _kind(obj: object, where: str) -> str:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        return "chat"
    if "prompt" in obj or "completion" in obj:
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
            raise InputError(f"{where}: 'prompt' and 'completion' must both be present and be strings")
        return "completion"
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise InputError(f"{where}: 'text' must be a string")
        return "text"
    raise InputError(f"{where}: no 'text', 'prompt'/'completion' or 'messages' field "
                     f"(found {', '.join(sorted(obj)) or 'none'})")


class ChatTemplate:
    """A chat template compiled in jinja2's immutable sandbox (templates from the Hub are untrusted code).

    The environment matches transformers': trim_blocks, lstrip_blocks, loop controls, a ``tojson``
    that does not escape HTML, ``raise_exception`` and ``strftime_now``; ``{% generation %}`` blocks
    render their body.
    """

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise InputError(f"the tokenizer's chat template does not compile ({err}); fix chat_template") from err
        self._special = special_tokens

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._special)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant marker) renders its body."""

    tags = {"generation"}  # noqa: RUF012  (jinja2's own class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token settings of tokenizer_config.json / config.json."""

    tokenizer: Tokenizer
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    add_bos: bool = False  # tokenizer_config's add_bos_token, where the post-processor does not add it already
    chat: ChatTemplate | None = None

    @classmethod
    def from_json(cls, tokenizer_json: str, *, tokenizer_config: dict[str, Any], model_config: dict[str, Any],
                  chat_template: str | None = None, source: str = "tokenizer.json") -> TextTokenizer:
        """Build from tokenizer.json's text, tokenizer_config.json and config.json (parsed);
        ``chat_template`` overrides tokenizer_config's (transformers 5 saves it as chat_template.jinja)."""
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise InputError("train needs the tokenizers library (pip install tokenizers)") from err
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # the Rust side raises plain Exceptions for any parse failure
            raise InputError(f"{source}: not a tokenizers file ({err})") from err
        special = {k: _token_text(v) for k, v in tokenizer_config.items()
                   if k.endswith("_token") and _token_text(v) is not None}
        eos_id = _token_id(tokenizer, special.get("eos_token"), model_config.get("eos_token_id"))
        if eos_id is None:
            raise InputError(f"{source}: no EOS token (tokenizer_config.json has no eos_token and config.json "
                             "no eos_token_id); training needs one to separate examples")
        bos_id = _token_id(tokenizer, special.get("bos_token"), model_config.get("bos_token_id"))
        pad_id = _token_id(tokenizer, special.get("pad_token"), model_config.get("pad_token_id"))
        template = chat_template if chat_template is not None else tokenizer_config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        tok = cls(tokenizer, eos_id=eos_id, pad_id=eos_id if pad_id is None else pad_id, bos_id=bos_id,
                  chat=ChatTemplate(template, special) if isinstance(template, str) else None)
        if tokenizer_config.get("add_bos_token") and bos_id is not None:
            tok.add_bos = tok.tokenizer.encode("a", add_special_tokens=True).ids[:1] != [bos_id]
        return tok

    def encode(self, text: str, *, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets); ``special`` adds what the post-processor and add_bos_token say."""
        enc = self.tokenizer.encode(text, add_special_tokens=special)
        ids, offsets = list(enc.ids), list(enc.offsets)
        if special and self.add_bos and self.bos_id is not None:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        return ids, offsets


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):  # an AddedToken saved as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(tokenizer: Tokenizer, text: str | None, config_id: object) -> int | None:
    if text is not None and tokenizer.token_to_id(text) is not None:
        return tokenizer.token_to_id(text)
    if isinstance(config_id, list):
        config_id = config_id[0] if config_id else None
    return config_id if isinstance(config_id, int) else None


def tokenize_records(records: list[Record], tok: TextTokenizer, *, source: str) -> tuple[list[Example], int]:
    """Token ids and labels of every record; also how many conversations train on the whole text.

    Raises:
        AdapterToolError: a chat record without a chat template, or one the template refuses.
    """
    examples = []
    whole = 0
    for record in records:
        f = record.fields
        if record.kind == "text":
            ids, _ = tok.encode(f["text"], special=True)
            ids = _with_eos(ids, tok.eos_id)
            examples.append(Example(ids, list(ids)))
        elif record.kind == "completion":
            prompt, _ = tok.encode(f["prompt"], special=True)
            completion = _with_eos(tok.encode(f["completion"], special=False)[0], tok.eos_id)
            examples.append(Example(prompt + completion, [IGNORE] * len(prompt) + completion))
        else:
            example, on_whole = _chat_example(f["messages"], tok, f"{source}:{record.line}")
            examples.append(example)
            whole += on_whole
    return examples, whole


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids[-1:] == [eos_id] else [*ids, eos_id]


def _chat_example(messages: list[dict[str, Any]], tok: TextTokenizer, where: str) -> tuple[Example, bool]:
    if tok.chat is None:
        raise InputError(f"{where}: a 'messages' record, but the tokenizer has no chat_template "
                         "(tokenizer_config.json or chat_template.jinja); use text or prompt/completion")
    try:
        text = tok.chat.render(messages)
    except jinja2.TemplateError as err:
        raise InputError(f"{where}: the chat template refuses this conversation ({err})") from err
    spans = _assistant_spans(messages, tok.chat, text)
    ids, offsets = tok.encode(text, special=False)
    if not spans:
        return Example(ids, list(ids)), True
    labels = [i if any(a <= start < b for a, b in spans) else IGNORE for i, (start, _) in zip(ids, offsets)]
    return Example(ids, labels), False


def _assistant_spans(messages: list[dict[str, Any]], chat: ChatTemplate, text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``text``; [] when they cannot be found reliably."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = chat.render(messages[:i], add_generation_prompt=True)
            after = chat.render(messages[: i + 1])
        except jinja2.TemplateError:
            return []
        if not (text.startswith(after) and after.startswith(before)) or len(after) == len(before):
            return []
        spans.append((len(before), len(after)))
    return spans


def build_dataset(examples: list[Example], *, seq_len: int, batch_size: int, packing: bool, pad_id: int,
                  seed: int, records: int = 0, whole_chat_loss: int = 0) -> Dataset:
    """Cut examples into batches: packed ``seq_len`` blocks, or truncated length-grouped padded batches.

    Packed blocks are shuffled once (``seed``) before batching; the batch order of each epoch comes
    from :func:`epoch_order`.
    """
    counts = {"records": records or len(examples), "whole_chat_loss": whole_chat_loss}
    if packing:
        stream_ids = [t for e in examples for t in e.ids]
        stream_labels = [t for e in examples for t in e.labels]
        blocks = [Example(stream_ids[i:i + seq_len], stream_labels[i:i + seq_len])
                  for i in range(0, len(stream_ids), seq_len)]
        order = _permutation(len(blocks), seed)
        blocks = [blocks[i] for i in order]
        kept = examples
        stats = DataStats(tokens=len(stream_ids), target_tokens=_targets(blocks), **counts)
    else:
        truncated = [e for e in examples if len(e.ids) > seq_len]
        cut = [Example(e.ids[:seq_len], e.labels[:seq_len]) for e in examples]
        kept = [e for e in cut if any(t != IGNORE for t in e.labels[1:])]
        blocks = sorted(kept, key=lambda e: len(e.ids))
        stats = DataStats(tokens=sum(len(e.ids) for e in kept), target_tokens=_targets(kept),
                          truncated=len(truncated), truncated_tokens=sum(len(e.ids) - seq_len for e in truncated),
                          dropped=len(cut) - len(kept), **counts)
    if not kept or stats.target_tokens == 0:
        raise InputError("the data has no token to train on (every completion cut off by --seq-len?); "
                         "raise --seq-len or check the data")
    batches = [_collate(blocks[i:i + batch_size], pad_id) for i in range(0, len(blocks), batch_size)]
    return Dataset(batches, replace(stats, batches=len(batches)))


def _targets(examples: list[Example]) -> int:
    # Position 0 of a row is never predicted (nothing precedes it).
    return sum(sum(t != IGNORE for t in e.labels[1:]) for e in examples)


def _collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example: pad id, IGNORE labels, False in the mask."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.int64)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.ids)] = torch.tensor(e.labels)
        mask[row, : len(e.ids)] = True
    return Batch(ids, labels, None if bool(mask.all()) else mask)


def _permutation(n: int, seed: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def epoch_order(n_batches: int, *, seed: int, epoch: int) -> list[int]:
    """The batch order of ``epoch``: a permutation that depends only on (seed, epoch), so a resumed
    run replays it without saving it."""
    return _permutation(n_batches, seed * 1_000_003 + epoch + 1)

