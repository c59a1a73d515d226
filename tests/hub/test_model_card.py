"""The model card push writes: YAML metadata from what the folder holds, an existing card's body kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.hub import PushConfig, model_card, push
from adaptertool.ops.quantize import QuantConfig, quantize
from tests.hub.fake_hub import TOKEN, FakeHub


def _split(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_lora_adapter_card(tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY, base_model="HuggingFaceTB/SmolLM2-135M")
    card = model_card(adapter, "me/my-lora")
    meta, body = _split(card.text)
    assert card.kind == "adapter"
    assert meta == {"library_name": "peft", "base_model": "HuggingFaceTB/SmolLM2-135M", "base_model_relation": "adapter",
                    "pipeline_tag": "text-generation", "tags": ["adaptertool", "lora", "peft"]}
    assert body.startswith("\n# my-lora\n") and "LORA adapter (rank 4, targets: q_proj, v_proj)" in body


@pytest.mark.parametrize(("recorded", "expected"), [
    ("/home/me/.cache/huggingface/hub/models--org--base/snapshots/" + "a" * 40, "org/base"),  # a hub id resolved by us
    ("./local/base-model", None),  # a local path is no Hub id
    ("org/base@dev", None),
])
def test_adapter_base_model_from_recorded_path(tmp_path: Path, recorded: str, expected: str | None) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY, base_model=recorded)
    meta, _ = _split(model_card(adapter, "me/x").text)
    assert meta.get("base_model") == expected


def test_dora_and_qlora_tags(tmp_path: Path) -> None:
    base = tmp_path / "base-nf4"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    adapter = write_lora_adapter(tmp_path / "lora", TINY, base_model=str(base))
    _edit_json(adapter / "adapter_config.json", use_dora=True)
    meta, _ = _split(model_card(adapter, "me/x").text)
    assert meta["tags"] == ["adaptertool", "lora", "peft", "dora", "qlora"] and "base_model" not in meta


def test_quantized_model_card(tmp_path: Path) -> None:
    write_llama(tmp_path / "base", TINY, dtype=torch.float32)
    quantize(QuantConfig(source=tmp_path / "base", out=tmp_path / "nf4"))
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    card = model_card(tmp_path / "nf4", "me/tiny-nf4")
    meta, body = _split(card.text)
    assert card.kind == "quantized model"
    assert meta == {"library_name": "transformers", "tags": ["adaptertool", "bitsandbytes", "4-bit", "nf4"]}
    for key, value in config.items():  # every setting of quantization_config, but transformers' private copies
        assert (f"- `{key}`: `{value}`" in body) != key.startswith("_")
    assert "bnb_4bit_quant_type`: `nf4`" in body


def test_merged_model_card_reads_provenance_metadata(tmp_path: Path) -> None:
    # The keys merge records: the base and the adapters folded in, as Hub ids where they came from the Hub.
    folder = tmp_path / "merged"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors",
              metadata={"format": "pt", "adaptertool.base_model": "org/base",
                        "adaptertool.adapters": json.dumps(["org/lora-a:1", "org/lora-b:0.5", "/home/me/adapters/style:0.3"])})
    card = model_card(folder, "me/merged")
    meta, body = _split(card.text)
    assert card.kind == "merged model" and meta == {"base_model": "org/base", "tags": ["adaptertool", "merge"]}
    assert "- org/lora-a (weight 1)\n- org/lora-b (weight 0.5)\n- style (weight 0.3)\n" in body


def test_existing_card_keeps_its_body_and_user_metadata(tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY, base_model="org/base")
    readme = "---\nlicense: mit\ntags:\n- chat\n- lora\nbase_model: old/guess\n---\n# My adapter\n\nTrained on my notes.\n"
    (adapter / "README.md").write_text(readme)
    meta, body = _split(model_card(adapter, "me/x", existing=readme).text)
    assert meta["license"] == "mit" and meta["base_model"] == "org/base"  # what the files say wins
    assert meta["tags"] == ["chat", "lora", "adaptertool", "peft"]
    assert body == "\n# My adapter\n\nTrained on my notes.\n"
    assert (adapter / "README.md").read_text() == readme  # the folder is never modified


def test_push_keeps_the_folders_card_else_the_repos(hub: FakeHub, tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY, base_model="org/base")
    on_hub = "---\nlicense: apache-2.0\n---\nWritten on the Hub page.\n"
    hub.seed("me/lora", {"README.md": on_hub.encode()})
    report = push(PushConfig(path=adapter, repo_id="me/lora", endpoint=hub.url, token=TOKEN))
    meta, body = _split(hub.files("me/lora")["README.md"].decode())
    assert report.card == "updated" and meta["license"] == "apache-2.0" and meta["library_name"] == "peft"
    assert body == "\nWritten on the Hub page.\n"
    (adapter / "README.md").write_text("Local notes.\n")  # a card in the folder wins over the Hub's
    push(PushConfig(path=adapter, repo_id="me/lora", endpoint=hub.url, token=TOKEN, revision="dev"))
    meta, body = _split(hub.files("me/lora", "dev")["README.md"].decode())
    assert "license" not in meta and body == "\nLocal notes.\n"


def test_pushed_card_holds_no_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    adapter = write_lora_adapter(tmp_path / "lora", TINY, base_model="org/base")
    report = push(PushConfig(path=adapter, repo_id="me/lora", endpoint=hub.url))  # token from HF_TOKEN
    card = hub.files("me/lora")["README.md"].decode()
    assert report.card == "new" and card == model_card(adapter, "me/lora").text and TOKEN not in card
