"""extract: planted low-rank fine-tunes of tiny Llamas (quick) and a real fine-tune of SmolLM2-135M (slow).

Oracles: the planted delta itself, the exact SVD (float64 singular values), our own merge of the
extracted adapter, and PEFT loading it (no missing-key warning, same logits as our merge).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adaptertool.adapters import svd
from adaptertool.adapters.svd import RankPolicy, break_even_rank, factor_delta
from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.io import (
    CheckpointWriter,
    TensorSpec,
    dtype_code,
    open_checkpoint,
    staged_output,
)
from adaptertool.ops.examples import LlamaShape, write_llama
from adaptertool.ops.extract import ExtractConfig, extract
from adaptertool.ops.merge import MergeConfig, merge

# Big enough for the bf16 noise edge to be sharp (a 32-wide TINY matrix has only 32 singular values).
SMALL = LlamaShape(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=96, tied=True)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write_like(src: Path, out: Path, change: Callable[[str, torch.Tensor], torch.Tensor], *,
                dtype: torch.dtype | None = None, config: dict | None = None) -> Path:
    """Write ``src``'s tensors through ``change(name, float32 tensor)`` to ``out`` (same dtypes unless ``dtype``)."""
    with open_checkpoint(src) as base, staged_output(out, force=True) as tmp:
        specs = [TensorSpec(s.name, dtype_code(dtype) if dtype else s.dtype, s.shape) for s in base.specs()]
        with CheckpointWriter(tmp, specs, max_shard_bytes=None) as writer:
            for spec in writer.order:
                writer.write(spec.name, change(spec.name, base.read(spec.name).float()).to(dtype or base.read(spec.name).dtype))
        shutil.copy(src / "config.json", tmp / "config.json")
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


def _low_rank(name: str, shape: tuple[int, ...], rank: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) * (scale / rank**0.5)


def _planted(rank: int, targets: tuple[str, ...] = LINEAR) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 2 and any(f".{m}." in name for m in targets):
            return t + _low_rank(name, tuple(t.shape), rank, 0.002)
        return t
    return change


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    base = root / "base"
    write_llama(base, SMALL, dtype=torch.bfloat16)
    return {"root": root, "base": base, "tuned8": _write_like(base, root / "tuned8", _planted(8))}


def _dense(adapter: Path, module: str) -> torch.Tensor:
    with open_checkpoint(adapter) as ckpt:
        key = f"base_model.model.{module}"
        return ckpt.read(f"{key}.lora_B.weight").float() @ ckpt.read(f"{key}.lora_A.weight").float()


def test_planted_rank8_recovered_and_auto_rank_picks_8(small: dict[str, Path], tmp_path: Path) -> None:
    fixed = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "r8", rank=8))
    auto = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "auto", auto_rank=True))
    assert {m.rank for m in auto.modules} == {8}
    assert len(fixed.modules) == 2 * len(LINEAR) and fixed.unchanged == []
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and "rank_pattern" not in config
    assert sorted(config["target_modules"]) == sorted(LINEAR)
    with open_checkpoint(small["base"]) as base, open_checkpoint(small["tuned8"]) as tuned:
        for m in fixed.modules:
            name = f"{m.module}.weight"
            true = _low_rank(name, tuple(base[name].shape), 8, 0.002)
            noise = (tuned.read(name).float() - base.read(name).float() - true).norm() / true.norm()
            error = (_dense(tmp_path / "r8", m.module) - true).norm() / true.norm()
            assert error <= noise, m.module  # at (below) the bf16 rounding-noise level
            assert m.rel_error == pytest.approx(float(noise), rel=0.25)


def test_merge_of_the_adapter_reproduces_the_fine_tune(small: dict[str, Path], tmp_path: Path) -> None:
    # float32 tuned: no rounding noise, so rank 8 is exact and merging gives TUNED back.
    tuned = _write_like(small["base"], tmp_path / "tuned", _planted(8), dtype=torch.float32)
    report = extract(ExtractConfig(base=small["base"], tuned=tuned, out=tmp_path / "ad", rank=8, svd="exact"))
    assert report.rel_error < 1e-5 and report.retained > 1 - 1e-9
    assert any("BF16 in BASE but F32 in TUNED" in note for note in report.notes)
    assert report.noise_floor == 0.0 and not _notes_about(report, "rounding noise")  # float32: no storage noise
    merge(MergeConfig(base=small["base"], adapters=((tmp_path / "ad", 1.0),), out=tmp_path / "merged", dtype=torch.float32))
    with open_checkpoint(tmp_path / "merged") as merged, open_checkpoint(tuned) as want:
        for name in want:
            torch.testing.assert_close(merged.read(name), want.read(name), atol=2e-6, rtol=0, msg=name)


def test_randomized_matches_exact_and_is_deterministic(small: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for label, method in (("a", "randomized"), ("b", "randomized"), ("exact", "exact")):
        runs[label] = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / label, rank=4,
                                            svd=method))
    files = ("adapter_model.safetensors", "adapter_config.json")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    for fast, best in zip(runs["a"].modules, runs["exact"].modules, strict=True):
        assert fast.rel_error <= best.rel_error * 1.01, fast.module


def test_unchanged_modules_skipped_and_named_in_full(small: dict[str, Path], tmp_path: Path) -> None:
    # Only layer 0's q_proj and every v_proj change: layer 1's q_proj must not be wrapped by PEFT.
    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(("layers.0.self_attn.q_proj.weight", "v_proj.weight")):
            return t + _low_rank(name, tuple(t.shape), 2, 0.01)
        return t
    tuned = _write_like(small["base"], tmp_path / "tuned", change)
    report = extract(ExtractConfig(base=small["base"], tuned=tuned, out=tmp_path / "ad", rank=2))
    assert [m.module for m in report.modules] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                                  "model.layers.1.self_attn.v_proj"]
    assert len(report.unchanged) == 2 * len(LINEAR) - 3
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "v_proj"]
    assert "modules_to_save" not in config  # embeddings unchanged: not saved


def test_energy_policy_writes_rank_and_alpha_patterns(small: dict[str, Path], tmp_path: Path) -> None:
    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith("q_proj.weight"):
            return t + _low_rank(name, tuple(t.shape), 3, 0.01)
        if name.endswith("down_proj.weight"):
            return t + _low_rank(name, tuple(t.shape), 6, 0.01)
        return t
    tuned = _write_like(small["base"], tmp_path / "tuned", change, dtype=torch.float32)
    extract(ExtractConfig(base=small["base"], tuned=tuned, out=tmp_path / "ad", energy=0.999999, svd="exact"))
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 6  # a tie (2 modules each): the larger rank wins
    pattern = {r"model\.layers\.0\.self_attn\.q_proj": 3, r"model\.layers\.1\.self_attn\.q_proj": 3}
    assert config["rank_pattern"] == pattern and config["alpha_pattern"] == pattern


def test_rank_past_the_size_break_even_is_capped_in_bytes(small: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--rank 1000 on bf16 weights: float32 factors stop being smaller than the bf16 delta at half the
    element break-even. Every module is capped there, with a note, and no SVD looks past the cap."""
    widths: list[int] = []
    real = svd.randomized_svd
    monkeypatch.setattr(svd, "randomized_svd", lambda delta, rank, **kw: widths.append(rank) or real(delta, rank, **kw))
    report = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "ad", rank=1000))
    assert widths == []  # sketches this wide (> 30 % of the matrix) take the exact SVD, at the cap's width
    with open_checkpoint(tmp_path / "ad") as ckpt:
        for m in report.modules:
            out_features, in_features = m.shape
            assert m.rank == break_even_rank(out_features, in_features, factor_bytes=4, delta_bytes=2), m.module
            assert m.capped and m.size_capped
            key = f"base_model.model.{m.module}"
            factors = ckpt[f"{key}.lora_A.weight"].nbytes + ckpt[f"{key}.lora_B.weight"].nbytes
            assert factors < out_features * in_features * 2 <= factors + (out_features + in_features) * 4, m.module
    assert _notes_about(report, "capped below the requested rank") == [
        "14 modules capped below the requested rank, where their fp32 LoRA factors r*(out+in) would be no smaller "
        "than the dense bf16 delta out*in, so a low rank gains nothing: 2 down_proj 128x256 at r=42; "
        "4 gate_proj/up_proj 256x128 at r=42; 4 k_proj/v_proj 64x128 at r=21; 4 o_proj/q_proj 128x128 at r=31 "
        "(--dtype bf16 factors halve their size and double the cap)"]
    half = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "bf16", rank=1000,
                                 dtype=torch.bfloat16))
    assert {m.module.rpartition(".")[2]: m.rank for m in half.modules} == {
        "down_proj": 85, "gate_proj": 85, "up_proj": 85, "k_proj": 42, "v_proj": 42, "o_proj": 63, "q_proj": 63}
    [note] = _notes_about(half, "capped below")
    assert "bf16 LoRA factors" in note and "--dtype bf16" not in note
    assert not _notes_about(extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "r16")),
                            "capped")


def test_bf16_rounding_noise_floor_is_named_with_auto_rank_as_the_way_out(small: dict[str, Path], tmp_path: Path) -> None:
    """A rank-8 change stored in bf16, extracted at rank 8: the relative error left is the rounding of
    TUNED, not missed fine-tune, and the report says so."""
    report = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "r8", rank=8))
    [note] = _notes_about(report, "rounding noise alone")
    assert note == (f"TUNED is stored in bf16: its rounding noise alone leaves a relative error of about "
                    f"{report.noise_floor:.2f} of the {report.rel_error:.2f}, so most of the error is storage noise in the "
                    "delta, not fine-tune the adapter misses; try --auto-rank, which keeps per module only the "
                    "singular values above that noise")
    assert 0.8 * report.rel_error <= report.noise_floor <= report.rel_error
    assert all(0.8 * m.rel_error <= m.noise_floor <= m.rel_error for m in report.modules)
    auto = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "auto", auto_rank=True))
    [note] = _notes_about(auto, "rounding noise alone")
    assert note.endswith("; --auto-rank kept only what rises above that noise")
    # Rank 2 of a rank-8 change leaves out mostly fine-tune: no such note.
    low = extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "r2", rank=2))
    assert low.noise_floor < 0.5 * low.rel_error and not _notes_about(low, "rounding noise")


def test_changed_norms_saved_whole_load_in_peft_and_merge(small: dict[str, Path], tmp_path: Path) -> None:
    """Layer 0's norms and the final norm change beside a rank-8 change: the norms go to
    modules_to_save whole, PEFT loads them with no missing key, and our merge and PEFT both give the
    fine-tune back; --no-norms leaves them out with a note, and the logits then miss them."""
    planted = _planted(8)

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.startswith(("model.layers.0.", "model.norm.")) and name.endswith("norm.weight"):
            return t * 1.5
        return planted(name, t)
    tuned = _write_like(small["base"], tmp_path / "tuned", change, dtype=torch.float32)
    report = extract(ExtractConfig(base=small["base"], tuned=tuned, out=tmp_path / "ad", rank=8, svd="exact"))
    norms = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]
    assert sorted(report.modules_to_save) == norms
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"] == norms
    assert sorted((n.module, n.tensors, n.bytes) for n in report.norms) == [
        (m, [f"{m}.weight"], SMALL.hidden * 4) for m in norms]
    assert all(n.rel_change == pytest.approx(0.5) for n in report.norms)
    assert not _notes_about(report, "norm")
    with open_checkpoint(tmp_path / "ad") as ckpt:  # PEFT's own layout: the module's tensors under its path
        assert ckpt["base_model.model.model.norm.weight"].shape == (SMALL.hidden,)
    ids = torch.tensor([[1, 5, 17, 33, 60, 2]])
    theirs, ours = _peft_and_merge_logits(small["base"], tmp_path / "ad", tmp_path, ids)
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)

    code, out, _ = _cli("extract", str(small["base"]), str(tuned), str(tmp_path / "dropped"), "--rank", "8", "--no-norms")
    assert code == 0
    assert ("note: 3 changed norm tensors are not in the adapter (e.g. model.layers.0.input_layernorm.weight); "
            "--no-norms leaves them out") in out
    (tmp_path / "b").mkdir()
    theirs, _ = _peft_and_merge_logits(small["base"], tmp_path / "dropped", tmp_path / "b", ids)
    assert (theirs - want).abs().max() > 1e-2
    code, out, _ = _cli("extract", str(small["base"]), str(tuned), str(tmp_path / "kept"), "--rank", "8")
    assert ("  norms: 3 changed modules saved whole (modules_to_save, 1.5 KB), relative change 0.5000-0.5000 "
            "(largest model.layers.0.input_layernorm)") in out.splitlines()
    assert "modules_to_save:" not in out  # the norms are summed up, not listed on the total line


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _peft_and_merge_logits(base: Path, adapter: Path, tmp_path: Path, ids: torch.Tensor,
                           compute: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(PEFT's logits on base + adapter, loaded with no missing-key warning; our merge's logits).

    Our merge is written in float32 either way; ``compute`` is the dtype both models run in.
    """
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=compute)
        peft_model = peft.PeftModel.from_pretrained(model, adapter)
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "merged", dtype=torch.float32))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=compute)
    with torch.no_grad():
        return peft_model(ids).logits, merged(ids).logits


def _biased_base(tmp_path: Path, shape: LlamaShape) -> Path:
    """A Llama with attention biases (non-zero, unlike transformers' initialisation), saved by transformers."""
    import transformers

    plain = write_llama(tmp_path / "plain", shape, dtype=torch.float32)[0].parent
    config = {**json.loads((plain / "config.json").read_text()), "attention_bias": True}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_changed_tied_embedding_saved_with_its_head_and_bias_sets_lora_bias(tmp_path: Path) -> None:
    """A base with attention biases: changed biases -> lora_B.bias; a changed tied embedding -> both
    embed_tokens and lm_head in modules_to_save. PEFT must load it cleanly and match our merge."""
    transformers = pytest.importorskip("transformers")
    base = _biased_base(tmp_path, SMALL)

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(("q_proj.weight", "o_proj.weight")):
            t = t + _low_rank(name, tuple(t.shape), 4, 0.05)
        if name.endswith(("k_proj.bias", "q_proj.bias")) or name == "model.embed_tokens.weight":
            t = t + 0.05
        return t
    tuned = _write_like(base, tmp_path / "tuned", change)
    report = extract(ExtractConfig(base=base, tuned=tuned, out=tmp_path / "ad", rank=4, report=tmp_path / "r.json"))
    adapter_config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert adapter_config["lora_bias"] is True
    assert adapter_config["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    # k_proj: only its bias changed, carried by a rank-1 zero update; o_proj gets a zero bias.
    assert {m.module.rpartition(".")[2]: (m.rank, m.bias) for m in report.modules} == {
        "q_proj": (4, True), "k_proj": (1, True), "o_proj": (4, False)}
    assert json.loads((tmp_path / "r.json").read_text())["modules"][0]["rank"] == report.modules[0].rank
    with open_checkpoint(tmp_path / "ad") as ckpt:
        assert not ckpt.read("base_model.model.model.layers.0.self_attn.o_proj.lora_B.bias").any()

    ids = torch.tensor([[1, 5, 17, 33, 60, 2]])
    theirs, ours = _peft_and_merge_logits(base, tmp_path / "ad", tmp_path, ids)
    tuned_model = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    with torch.no_grad():
        want = tuned_model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)  # rank 4 = the planted rank: exact


def test_embeddings_lora_factors_embedding_and_head(tmp_path: Path) -> None:
    """Untied embedding and head changed by rank-4 updates: --embeddings lora recovers both exactly,
    the embedding in PEFT's lora_embedding_A/B layout, the head as a Linear LoRA."""
    transformers = pytest.importorskip("transformers")
    base = tmp_path / "base"
    write_llama(base, dataclasses.replace(SMALL, tied=False), dtype=torch.float32)
    embeddings = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.up_proj.weight")
    tuned = _write_like(base, tmp_path / "tuned",
                        lambda n, t: t + _low_rank(n, tuple(t.shape), 4, 0.5) if n in embeddings else t)
    report = extract(ExtractConfig(base=base, tuned=tuned, out=tmp_path / "ad", rank=4, embeddings="lora"))
    assert {m.module: m.shape for m in report.modules} == {
        "model.embed_tokens": [SMALL.hidden, SMALL.vocab], "lm_head": [SMALL.vocab, SMALL.hidden],
        "model.layers.1.mlp.up_proj": [SMALL.intermediate, SMALL.hidden]}
    assert report.modules_to_save == [] and report.rel_error < 1e-5
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["embed_tokens", "lm_head", "model.layers.1.mlp.up_proj"]
    with open_checkpoint(tmp_path / "ad") as ckpt:
        key = "base_model.model.model.embed_tokens"
        assert ckpt[f"{key}.lora_embedding_A"].shape == (4, SMALL.vocab)
        assert ckpt[f"{key}.lora_embedding_B"].shape == (SMALL.hidden, 4)
    ids = torch.tensor([[1, 5, 17, 33, 60, 2]])
    theirs, ours = _peft_and_merge_logits(base, tmp_path / "ad", tmp_path, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    tuned_model = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours, tuned_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_embeddings_lora_refuses_changed_biases(tmp_path: Path) -> None:
    # PEFT has no lora_bias for an embedding LoRA and refuses to load such an adapter.
    base = _biased_base(tmp_path, dataclasses.replace(SMALL, tied=False))
    tuned = _write_like(base, tmp_path / "tuned", lambda n, t: t + 0.05 if n.endswith("q_proj.bias") or
                        n == "model.embed_tokens.weight" else t)
    with pytest.raises(AdapterToolError, match=r"changed biases need PEFT's lora_bias, which PEFT does not allow beside "
                                               r"the embedding LoRA of model\.embed_tokens; use --embeddings save"):
        extract(ExtractConfig(base=base, tuned=tuned, out=tmp_path / "ad", rank=4, embeddings="lora"))
    assert not (tmp_path / "ad").exists()
    extract(ExtractConfig(base=base, tuned=tuned, out=tmp_path / "ad", rank=4, embeddings="save"))


def test_embeddings_lora_refuses_a_changed_tied_embedding(small: dict[str, Path], tmp_path: Path) -> None:
    tuned = _write_like(small["base"], tmp_path / "tuned", lambda n, t: t + 0.01 if n == "model.embed_tokens.weight" else t)
    with pytest.raises(AdapterToolError, match="head is tied to it.*--embeddings save"):
        extract(ExtractConfig(base=small["base"], tuned=tuned, out=tmp_path / "ad", embeddings="lora"))
    assert not (tmp_path / "ad").exists()


def test_gpt2_conv1d_weights_factored_in_peft_layout(tmp_path: Path) -> None:
    """GPT-2 stores projections (in, out): the adapter must say fan_in_fan_out and PEFT must apply it
    as the fine-tune did."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    projections = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(projections):
            return t + _low_rank(name, tuple(t.shape), 4, 0.2)
        # LayerNorms (weight and bias) and a Linear bias change too, as in a real fine-tune.
        if name in ("transformer.h.0.ln_1.bias", "transformer.h.1.mlp.c_fc.bias"):
            return t + 0.05
        return t * 1.1 if name == "transformer.ln_f.weight" else t
    tuned = _write_like(tmp_path / "base", tmp_path / "tuned", change)
    report = extract(ExtractConfig(base=tmp_path / "base", tuned=tuned, out=tmp_path / "ad", rank=4))
    assert len(report.modules) == 8 and report.rel_error < 1e-5
    assert {tuple(m.shape) for m in report.modules if m.module.endswith("c_attn")} == {(192, 64)}  # [out, in]
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    # PEFT copies a modules_to_save module whole: ln_1's unchanged weight goes with its changed bias.
    assert report.modules_to_save == ["transformer.h.0.ln_1", "transformer.ln_f"]
    assert {n.module: sorted(n.tensors) for n in report.norms} == {
        "transformer.h.0.ln_1": ["transformer.h.0.ln_1.bias", "transformer.h.0.ln_1.weight"],
        "transformer.ln_f": ["transformer.ln_f.bias", "transformer.ln_f.weight"]}
    ln_f = report.norms[1]  # weight 1 and bias 0 at initialisation: the weight's 10 % is the module's
    assert ln_f.rel_change == pytest.approx(0.1, rel=1e-5) and ln_f.bytes == 2 * 64 * 4
    ids = torch.tensor([[1, 5, 17, 33, 60, 2]])
    theirs, ours = _peft_and_merge_logits(tmp_path / "base", tmp_path / "ad", tmp_path, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    tuned_model = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours, tuned_model(ids).logits, atol=1e-4, rtol=1e-4)
    # Left out, each kind of change is named with what would carry it.
    narrow = extract(ExtractConfig(base=tmp_path / "base", tuned=tuned, out=tmp_path / "narrow", rank=4,
                                   targets=("c_attn",), norms=False))
    assert narrow.modules_to_save == [] and narrow.norms == []
    assert _notes_about(narrow, "Linear weights outside --targets") == [
        "6 changed Linear weights outside --targets are not in the adapter (e.g. transformer.h.0.attn.c_proj.weight); "
        "add their modules to --targets to extract them"]
    assert _notes_about(narrow, "biases of modules outside --targets") == [
        "1 changed biases of modules outside --targets are not in the adapter (e.g. transformer.h.1.mlp.c_fc.bias); "
        "add the modules to --targets: a LoRA carries a bias as lora_B.bias"]
    assert _notes_about(narrow, "norm tensors") == [
        "2 changed norm tensors are not in the adapter (e.g. transformer.h.0.ln_1.bias); --no-norms leaves them out"]
    assert not _notes_about(narrow, "not linear weights")


def _notes_about(report: object, text: str) -> list[str]:
    return [note for note in report.notes if text in note]  # type: ignore[attr-defined]


def test_embeddings_skip_leaves_them_out_with_a_note(small: dict[str, Path], tmp_path: Path) -> None:
    tuned = _write_like(small["base"], tmp_path / "tuned",
                        lambda n, t: t + 0.01 if n in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight") else t)
    report = extract(ExtractConfig(base=small["base"], tuned=tuned, out=tmp_path / "ad", rank=1, embeddings="skip"))
    assert report.modules_to_save == [] and [m.module for m in report.modules] == ["model.layers.0.mlp.up_proj"]
    assert any("--embeddings skip" in note for note in report.notes)
    # Rank 1 captures a constant shift; what is left is the bf16 rounding of the tuned weights.
    assert report.rel_error < 0.01


def test_identical_models_say_there_is_nothing_to_extract(small: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AdapterToolError, match="identical tensors; nothing to extract"):
        extract(ExtractConfig(base=small["base"], tuned=small["base"], out=tmp_path / "ad"))
    norms_only = _write_like(small["base"], tmp_path / "norms", lambda n, t: t * 1.5 if n.endswith("norm.weight") else t)
    with pytest.raises(AdapterToolError, match="no targeted module changed"):
        extract(ExtractConfig(base=small["base"], tuned=norms_only, out=tmp_path / "ad"))
    assert not (tmp_path / "ad").exists()


def test_mismatched_checkpoints_name_the_tensor(small: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_llama(other, LlamaShape(hidden=128, intermediate=320, layers=2, heads=4, kv_heads=2, vocab=96, tied=True))
    with pytest.raises(AdapterToolError, match=r"tensor model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape \[(320, 128|128, 320)\] but"):
        extract(ExtractConfig(base=small["base"], tuned=other, out=tmp_path / "ad"))
    deeper = tmp_path / "deeper"
    write_llama(deeper, LlamaShape(hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2, vocab=96, tied=True))
    with pytest.raises(AdapterToolError, match=r"has tensor model\.layers\.2\.\S+, which .* lacks"):
        extract(ExtractConfig(base=small["base"], tuned=deeper, out=tmp_path / "ad"))
    with pytest.raises(AdapterToolError, match=r"has no tensor model\.layers\.2\.\S+, which"):
        extract(ExtractConfig(base=deeper, tuned=small["base"], out=tmp_path / "ad"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(AdapterToolError, match="already exists; pass --force"):
        extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "taken"))
    with pytest.raises(AdapterToolError, match="--targets qq_proj matches no 2-D weight"):
        extract(ExtractConfig(base=small["base"], tuned=small["tuned8"], out=tmp_path / "ad", targets=("qq_proj",)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "--rank must be a positive integer"),
    ({"energy": 1.01}, r"--energy must lie in \(0, 1\]"),
    ({"energy": 0.0}, r"--energy must lie in \(0, 1\]"),
    ({"svd": "full"}, "--svd must be randomized or exact"),
    ({"device": "tpu"}, "--device must be cpu, cuda or auto"),
], ids=["rank0", "energy>1", "energy0", "svd", "device"])
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(AdapterToolError, match=message):
        ExtractConfig(base=Path("b"), tuned=Path("t"), out=Path("o"), **kwargs)


# ---------------------------------------------------------------------------------------------
# Real model: SmolLM2-135M (bf16, tied embeddings) against a short real full fine-tune of it
# (fixtures/build_real_models.py: AdamW on every parameter, 12 steps).


@pytest.mark.slow
def test_smollm2_randomized_within_1pct_of_exact_at_8_16_64(smollm2: Path, smollm2_tuned: Path) -> None:
    worst = {8: 0.0, 16: 0.0, 64: 0.0}
    with open_checkpoint(smollm2) as base, open_checkpoint(smollm2_tuned) as tuned:
        names = [n for n in base if n.endswith("proj.weight")]
        assert len(names) == 210
        for name in names:
            delta = tuned.read(name).float() - base.read(name).float()
            s = torch.linalg.svdvals(delta.double())
            for rank, so_far in worst.items():
                optimal = math.sqrt(float(s[rank:].square().sum() / s.square().sum()))
                generator = torch.Generator().manual_seed(0)
                got = factor_delta(delta, RankPolicy(rank=rank), generator=generator).rel_error
                worst[rank] = max(so_far, got / optimal - 1)
                assert got <= optimal * 1.01, (name, rank, got, optimal)
    logging.getLogger(__name__).info("worst excess error over exact: %s", worst)


@pytest.mark.slow
def test_smollm2_adapter_loads_in_peft_and_matches_our_merge(smollm2: Path, smollm2_tuned: Path, tmp_path: Path) -> None:
    report = extract(ExtractConfig(base=smollm2, tuned=smollm2_tuned, out=tmp_path / "ad", rank=16))
    assert len(report.modules) == 210 and all(m.rank == 16 for m in report.modules)
    # The tied embedding (with its head) and the 60 layer norms the fine-tune moved (model.norm did not).
    assert set(report.modules_to_save) == {"lm_head", "model.embed_tokens", *SMOLLM2_NORMS}
    assert {n.module for n in report.norms} == SMOLLM2_NORMS and all(0 < n.rel_change < 0.05 for n in report.norms)
    assert not _notes_about(report, "not in the adapter")
    # At rank 16 most of what is left is the fine-tune's flat spectrum, not bf16 rounding (measured:
    # rounding is 0.44 of the 0.76, a third of the residual's energy).
    assert report.noise_floor**2 < 0.5 * report.rel_error**2 and not _notes_about(report, "rounding noise")
    assert 0.0 < report.retained < 1.0 and report.adapter_bytes < report.delta_bytes
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    # Both run in float64. In float32, PEFT's unmerged forward (W x + s B(A x)) and the merged one
    # (W' x) round differently through 30 layers, by amounts that depend on MKL's kernels and the
    # thread count (measured on an AVX-512 CPU: 4.5e-5 to 7.3e-5 with 1 or 2 threads, and over the
    # former atol 1e-4 in a full suite run). In float64 that noise is ~1e-12; what is left is the
    # float32 rounding of our merged weights, each within about one float32 ulp of W + s BA:
    # measured 1.2e-5 to 1.9e-5 (logits up to 34; 1 and 2 threads, three extractions). Another CPU
    # can only move the float32 B @ A product by an ulp, so 1e-4 keeps a 5x margin, while a 0.1 %
    # error in the adapter's scaling moves the logits by 1.5e-2.
    theirs, ours = _peft_and_merge_logits(smollm2, tmp_path / "ad", tmp_path, ids, compute=torch.float64)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


SMOLLM2_NORMS = {f"model.layers.{i}.{n}" for i in range(30) for n in ("input_layernorm", "post_attention_layernorm")}
# Held out: nothing like the fixture's fine-tuning text (fixtures/build_real_models.py TUNE_TEXT).
HELD_OUT = ("The river flooded the valley after three days of rain, and the farmers moved their animals to the hills.\n\n"
            "To bake bread, mix flour, water, salt and yeast, let the dough rise, then shape it and bake it in a hot oven.\n\n"
            "def add(a, b):\n    return a + b\n\nprint(add(2, 3))")


@pytest.mark.slow
def test_smollm2_keeping_the_changed_norms_tracks_the_fine_tune_better(smollm2: Path, smollm2_tuned: Path,
                                                                     tmp_path: Path) -> None:
    """End to end, on text the fine-tune never saw: KL(tuned || base + adapter), the adapter loaded by
    PEFT, is lower with the 60 changed RMSNorm weights saved (the default) than without them."""
    transformers = pytest.importorskip("transformers")
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(smollm2)(HELD_OUT).input_ids])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(smollm2_tuned, dtype=torch.float32)(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)(ids).logits
    kl = {}
    for norms in (True, False):
        out = tmp_path / f"norms-{norms}"
        extract(ExtractConfig(base=smollm2, tuned=smollm2_tuned, out=out, rank=16, norms=norms))
        (tmp_path / f"merge-{norms}").mkdir()
        theirs, ours = _peft_and_merge_logits(smollm2, out, tmp_path / f"merge-{norms}", ids)  # no missing keys
        kl[norms] = _kl(want, theirs)
        assert _kl(want, ours) == pytest.approx(kl[norms], rel=0.02)  # our merge agrees end to end
    logging.getLogger(__name__).info("KL to the tuned model: norms kept %.4f, dropped %.4f, base %.4f",
                                     kl[True], kl[False], _kl(want, base))
    # Measured: kept 0.0079, dropped 0.0099, the base 0.32.
    assert kl[True] < 0.95 * kl[False] and kl[False] < 0.1 * _kl(want, base)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(p || q), in float64."""
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())

