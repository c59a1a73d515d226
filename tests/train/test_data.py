"""Training data: record formats, label masks, packing, truncation, malformed lines, chat templates.

A tiny word-level tokenizer (built here with the tokenizers library) keeps the quick tests exact:
every word is one token. The slow tests use SmolLM2's real tokenizer and chat template, with
transformers' apply_chat_template as the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptertool.errors import AdapterToolError
from adaptertool.training.data import (
    IGNORE,
    TextTokenizer,
    build_dataset,
    epoch_order,
    parse_records,
    tokenize_records,
)

WORDS = ["hello", "world", "how", "are", "you", "fine", "thanks", "what", "is", "two", "plus", "four", "six", "the", "answer", "a", "b", "c", "d", "e", "f", "g"]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def _tiny_tokenizer(**config: object) -> TextTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tokenizer_config = {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>", "chat_template": TEMPLATE, **config}
    return TextTokenizer.from_json(tok.to_str(), tokenizer_config=tokenizer_config, model_config={})


def _ids(tok: TextTokenizer, text: str) -> list[int]:
    return tok.tokenizer.encode(text, add_special_tokens=False).ids


def _examples(lines: list[dict], tok: TextTokenizer):
    records = parse_records([json.dumps(x) for x in lines], source="d.jsonl")
    return tokenize_records(records, tok, source="d.jsonl")


def test_text_record_trains_on_everything_and_ends_with_eos() -> None:
    tok = _tiny_tokenizer()
    (ex,), whole = _examples([{"text": "hello world"}], tok)
    assert ex.ids == [*_ids(tok, "hello world"), tok.eos_id]
    assert ex.labels == ex.ids
    assert whole == 0


def test_add_bos_token_from_tokenizer_config() -> None:
    tok = _tiny_tokenizer(add_bos_token=True)
    (ex,), _ = _examples([{"text": "hello"}], tok)
    assert ex.ids == [tok.bos_id, *_ids(tok, "hello"), tok.eos_id]


def test_prompt_completion_masks_the_prompt() -> None:
    tok = _tiny_tokenizer()
    (ex,), _ = _examples([{"prompt": "what is two plus four", "completion": "six"}], tok)
    prompt, completion = _ids(tok, "what is two plus four"), _ids(tok, "six")
    assert ex.ids == prompt + completion + [tok.eos_id]
    assert ex.labels == [IGNORE] * len(prompt) + completion + [tok.eos_id]


def test_chat_loss_on_assistant_turns_only() -> None:
    tok = _tiny_tokenizer()
    messages = [{"role": "system", "content": "a b"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "what is two plus four"},
                {"role": "assistant", "content": "six"}]
    (ex,), whole = _examples([{"messages": messages}], tok)
    rendered = "".join(f"<|{m['role']}|> {m['content']} <|end|> " for m in messages)
    assert ex.ids == _ids(tok, rendered)
    trained = [t for t, label in zip(ex.ids, ex.labels) if label != IGNORE]
    # Each assistant turn: its content and its end marker (what the model must learn to produce).
    assert trained == _ids(tok, "fine thanks <|end|> six <|end|>")
    assert whole == 0


def test_chat_without_assistant_or_with_a_rewriting_template_trains_on_the_whole() -> None:
    tok = _tiny_tokenizer()
    (ex,), whole = _examples([{"messages": [{"role": "user", "content": "hello"}]}], tok)
    assert ex.labels == ex.ids and whole == 1
    # A template that marks the last turn differently: earlier renderings are not prefixes.
    rewriting = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %} <|end|>{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = _tiny_tokenizer(chat_template=rewriting)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    (ex,), whole = _examples([{"messages": msgs}], tok)
    assert ex.labels == ex.ids and whole == 1


def test_generation_tags_render_their_body() -> None:
    tagged = TEMPLATE.replace("{{ '<|' + m['role']", "{% generation %}{{ '<|' + m['role']").replace(
        "' <|end|> ' }}", "' <|end|> ' }}{% endgeneration %}")
    plain, tok = _tiny_tokenizer(), _tiny_tokenizer(chat_template=tagged)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert tok.chat.render(msgs) == plain.chat.render(msgs)


def test_chat_record_without_template_is_an_error() -> None:
    tok = _tiny_tokenizer(chat_template=None)
    tok.chat = None
    with pytest.raises(AdapterToolError, match=r"d\.jsonl:1: a 'messages' record, but the tokenizer has no chat_template"):
        _examples([{"messages": [{"role": "user", "content": "hello"}]}], tok)


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"d\.jsonl:3: not valid JSON"),
    ("[1, 2]", r"d\.jsonl:3: expected a JSON object, got list"),
    ('{"txt": "a"}', r"d\.jsonl:3: no 'text', 'prompt'/'completion' or 'messages' field \(found txt\)"),
    ('{"text": 5}', r"d\.jsonl:3: 'text' must be a string"),
    ('{"prompt": "a"}', r"d\.jsonl:3: 'prompt' and 'completion' must both be present"),
    ('{"messages": [{"role": "user"}]}', r"d\.jsonl:3: messages\[0\] must be an object with string 'role' and 'content'"),
    ('{"messages": []}', r"d\.jsonl:3: 'messages' must be a non-empty list"),
], ids=["json", "list", "fields", "text-type", "half-pair", "message", "empty-messages"])
def test_malformed_line_reported_with_its_number(line: str, message: str) -> None:
    # Line 2 is blank: skipped, but still counted.
    with pytest.raises(AdapterToolError, match=message):
        parse_records(['{"text": "hello"}', "", line, '{"text": "world"}'], source="d.jsonl")


def test_empty_file_is_an_error() -> None:
    with pytest.raises(AdapterToolError, match=r"d\.jsonl: holds no records"):
        parse_records(["", "  "], source="d.jsonl")


def test_packing_blocks_concatenate_examples_with_eos_between() -> None:
    tok = _tiny_tokenizer()
    lines = [{"text": "hello world how are you"}, {"prompt": "what is two plus four", "completion": "six"},
             {"text": "a b c d e f g"}]
    examples, _ = _examples(lines, tok)
    stream_ids = [t for e in examples for t in e.ids]
    stream_labels = [t for e in examples for t in e.labels]
    data = build_dataset(examples, seq_len=4, batch_size=2, packing=True, pad_id=tok.pad_id, seed=0)
    blocks = [(row_ids, row_labels, row_mask) for b in data.batches
              for row_ids, row_labels, row_mask in zip(b.input_ids.tolist(), b.labels.tolist(),
                                                       (b.attention_mask if b.attention_mask is not None
                                                        else torch.ones_like(b.input_ids, dtype=torch.bool)).tolist())]
    assert all(len(ids) == 4 for ids, _, _ in blocks)
    # The shuffled blocks are exactly the stream cut every 4 tokens; the last one is padded.
    n = len(stream_ids)
    expected = [(stream_ids[i:i + 4], stream_labels[i:i + 4]) for i in range(0, n, 4)]
    got = sorted((ids[:sum(mask)], labels[:sum(mask)]) for ids, labels, mask in blocks)
    assert got == sorted(expected)
    assert stream_ids.count(tok.eos_id) == 3  # one separator after each example
    tail = next(b for b in blocks if not all(b[2]))
    assert tail[0][sum(tail[2]):] == [tok.pad_id] * (4 - n % 4) and set(tail[1][sum(tail[2]):]) == {IGNORE}
    assert data.stats.tokens == n and data.stats.truncated == 0
    assert data.stats.target_tokens == sum(sum(t != IGNORE for t in labels[1:sum(mask)]) for _, labels, mask in blocks)


def test_no_packing_truncates_counts_and_groups_by_length() -> None:
    tok = _tiny_tokenizer()
    lines = [{"text": "a b c d e f g"}, {"text": "hello"}, {"text": "a b"},
             {"prompt": "what is two plus four the answer", "completion": "six"}, {"text": "how are you"}]
    examples, _ = _examples(lines, tok)
    data = build_dataset(examples, seq_len=5, batch_size=2, packing=False, pad_id=tok.pad_id, seed=0)
    # "a b c d e f g </s>" (8 tokens) loses 3; the prompt (7 tokens) fills the window: no target left.
    assert (data.stats.truncated, data.stats.truncated_tokens, data.stats.dropped) == (2, 3 + 4, 1)
    lengths = [b.input_ids.shape[1] for b in data.batches]
    assert lengths == sorted(lengths) and max(lengths) == 5
    rows = [(ids, m) for b in data.batches for ids, m in zip(b.input_ids.tolist(), (
        b.attention_mask if b.attention_mask is not None else torch.ones_like(b.input_ids, dtype=torch.bool)).tolist())]
    assert sorted(sum(m) for _, m in rows) == [2, 3, 4, 5]
    for ids, mask in rows:  # right padding
        assert ids[sum(mask):] == [tok.pad_id] * (len(ids) - sum(mask)) and all(mask[:sum(mask)])


def test_nothing_to_train_on_is_an_error() -> None:
    tok = _tiny_tokenizer()
    examples, _ = _examples([{"prompt": "what is two plus four", "completion": "six"}], tok)
    with pytest.raises(AdapterToolError, match="no token to train on"):
        build_dataset(examples, seq_len=3, batch_size=1, packing=False, pad_id=tok.pad_id, seed=0)


def test_epoch_order_is_a_seeded_permutation() -> None:
    assert sorted(epoch_order(10, seed=3, epoch=0)) == list(range(10))
    assert epoch_order(10, seed=3, epoch=0) == epoch_order(10, seed=3, epoch=0)
    assert epoch_order(10, seed=3, epoch=0) != epoch_order(10, seed=3, epoch=1)


def _smollm2_tokenizer(folder: Path, template: str | None = None) -> TextTokenizer:
    return TextTokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"),
                                   tokenizer_config=json.loads((folder / "tokenizer_config.json").read_text()),
                                   model_config=json.loads((folder / "config.json").read_text()),
                                   chat_template=template or (folder / "chat_template.jinja").read_text(encoding="utf-8"))


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, in French?"},
     {"role": "assistant", "content": "Rouge — «red».\nDone."}],
]


@pytest.mark.slow
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "system-two-turns"])
def test_smollm2_chat_equals_transformers_apply_chat_template(smollm2: Path, conversation: list[dict]) -> None:
    from transformers import AutoTokenizer

    assert (smollm2 / "tokenizer.json").is_file() and (smollm2 / "tokenizer_config.json").is_file()
    oracle = AutoTokenizer.from_pretrained(smollm2)
    tok = _smollm2_tokenizer(smollm2)
    (ex,), whole = _examples([{"messages": conversation}], tok)
    assert ex.ids == list(oracle.apply_chat_template(conversation, tokenize=True)["input_ids"])
    assert tok.chat.render(conversation) == oracle.apply_chat_template(conversation, tokenize=False)
    # The same mask as transformers derives from {% generation %} markers around the assistant turns.
    template = (smollm2 / "chat_template.jinja").read_text(encoding="utf-8")
    marked = template.replace("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
                              "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                              "{% generation %}{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}"
                              "{% else %}{{message['content'] + '<|im_end|>' + '\n'}}{% endif %}")
    assert marked != template
    out = oracle.apply_chat_template(conversation, tokenize=True, chat_template=marked, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == ex.ids
    assert [label != IGNORE for label in ex.labels] == [bool(m) for m in out["assistant_masks"]]
    assert whole == 0
    assert sum(label != IGNORE for label in ex.labels) > 0


@pytest.mark.slow
def test_smollm2_text_and_completion_tokenize_as_transformers(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    oracle = AutoTokenizer.from_pretrained(smollm2)
    tok = _smollm2_tokenizer(smollm2)
    (text, pair), _ = _examples([{"text": "The cat sat on the mat."},
                                 {"prompt": "Q: capital of France?\nA:", "completion": " Paris"}], tok)
    assert text.ids == oracle("The cat sat on the mat.")["input_ids"] + [oracle.eos_token_id]
    prompt = oracle("Q: capital of France?\nA:")["input_ids"]
    assert pair.ids == prompt + oracle(" Paris", add_special_tokens=False)["input_ids"] + [oracle.eos_token_id]
    assert pair.labels[: len(prompt)] == [IGNORE] * len(prompt)
