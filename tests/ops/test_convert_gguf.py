"""convert --to gguf: llama.cpp's LoRA adapter file, against llama.cpp's own tools.

Oracles: llama.cpp's convert_lora_to_gguf.py (vendored in llama-cpp-python's source distribution;
the ``llama_cpp_converter`` fixture) on the same adapters, whose files ours must equal; llama.cpp
itself (llama-cpp-python, where installed) generating from the SmolLM2 Q4_1 GGUF with either file;
PEFT's own delta of every module, against the delta llama.cpp's loader makes of our file
(src/llama-adapter.h: ``alpha / r`` from the file's float32 alpha and lora_b's shape, or 1 when
alpha is 0); and gguf's TensorNameMap for the tensor names. Files are read back with gguf.GGUFReader.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptertool.adapters.gguf_lora import GgufBase, gguf_target
from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.ops.convert_gguf import GgufConvertConfig, convert_to_gguf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Tiny decoders as transformers builds them: 2 layers, 4 heads of 8 over 2 KV heads, untied embeddings.
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128, "tie_word_embeddings": False}
# Machine epsilon of each GGUF float type: two roundings of one value to it differ by at most this, relatively.
EPSILON = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
PROMPT = b"The capital of France is"


def _tiny_base(folder: Path, model_type: str) -> Path:
    config = transformers.AutoConfig.for_model(model_type, **TINY)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _peft_adapter(base: Path, out: Path, *, seed: int = 0, **lora: Any) -> Path:
    """A PEFT LoRA saved by PEFT, every factor random (a trained look: PEFT starts B, or embedding A, at 0)."""
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                peft.LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


def _edit_config(adapter: Path, out: Path, **changes: Any) -> Path:
    """A copy of ``adapter`` with adapter_config.json changed."""
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


def _with_tensor(adapter: Path, out: Path, key: str, tensor: torch.Tensor) -> Path:
    """A copy of ``adapter`` with one more tensor in its weights."""
    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    save_file({**weights, key: tensor}, out / "adapter_model.safetensors")
    return out


def _read(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    """(metadata, {tensor: (type, numpy-order shape, float64 values)}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions innermost first
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        tensors[t.name] = (t.tensor_type.name, shape, values)
    return fields, tensors


def _assert_same_file(ours: Path, theirs: Path) -> None:
    """Same metadata, tensor names, types and shapes, and values within one rounding to the declared type."""
    our_fields, our_tensors = _read(ours)
    their_fields, their_tensors = _read(theirs)
    assert our_fields == their_fields
    assert our_tensors.keys() == their_tensors.keys()
    for name, (kind, shape, want) in their_tensors.items():
        got_kind, got_shape, got = our_tensors[name]
        assert (got_kind, got_shape) == (kind, shape), name
        assert np.all(np.abs(got - want) <= EPSILON[kind] * np.abs(want)), name


def _llama_cpp_convert(converter: Path, base: Path, adapter: Path, out: Path, outtype: str = "f32") -> Path:
    # The converter puts its own gguf-py first on sys.path (newer than PyPI's gguf, which it needs).
    subprocess.run([sys.executable, str(converter / "convert_lora_to_gguf.py"), "--base", str(base), "--outfile", str(out),
                    "--outtype", outtype, str(adapter)], check=True, capture_output=True, timeout=300)
    return out


def _convert(adapter: Path, out: Path, **options: Any) -> Path:
    convert_to_gguf(GgufConvertConfig(adapter=adapter, out=out, **options))
    return out


def _llama_rows(heads: int, head_dim: int) -> list[int]:
    """Row j of llama.cpp's q/k weight is transformers' row ``order[j]``: within each head the two
    rotary halves interleave (llama.cpp rotates adjacent pairs)."""
    return [h * head_dim + half * head_dim // 2 + i for h in range(heads) for i in range(head_dim // 2) for half in (0, 1)]


def _peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own delta of every adapted module (``get_delta_weight``), by module path, in the weight's layout."""
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                           adapter)
    with torch.no_grad():
        return {name.removeprefix("base_model.model."): module.get_delta_weight("default").double()
                for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}


def _llama_cpp_delta(fields: dict[str, Any], tensors: dict[str, Any], name: str) -> np.ndarray:
    """The delta llama.cpp's loader and graph make of one module of a GGUF adapter, in float64."""
    a, b = tensors[f"{name}.lora_a"][2], tensors[f"{name}.lora_b"][2]
    alpha, rank = fields.get("adapter.lora.alpha", 0.0), b.shape[1]
    scale = float(np.float32(alpha) / np.float32(rank)) if alpha else 1.0
    # token_embd: the rows of lora_a are looked up, then multiplied by lora_b (llm_build_inp_embd)
    return scale * (a @ b.T if name == "token_embd.weight" else b @ a)


# --- files and deltas on tiny models ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-bases")
    return {model_type: _tiny_base(root / model_type, model_type) for model_type in ("llama", "qwen3")}


@pytest.mark.parametrize(("model_type", "lora"), [
    ("llama", {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": PROJECTIONS}),
    ("llama", {"r": 4, "lora_alpha": 8, "target_modules": PROJECTIONS, "rank_pattern": {"v_proj": 2},
               "alpha_pattern": {"layers.1.self_attn.q_proj": 3, "k_proj": 5}}),
    ("qwen3", {"r": 6, "lora_alpha": 4, "use_rslora": True, "target_modules": PROJECTIONS,
               "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"o_proj": 7}}),
    ("llama", {"r": 3, "lora_alpha": 0, "alpha_pattern": {"layers.0.self_attn.k_proj": 2},
               "target_modules": ["q_proj", "k_proj"]}),
    ("qwen3", {"r": 2, "lora_alpha": 5, "target_modules": ["embed_tokens", "lm_head", "k_proj"]}),
], ids=["rslora", "patterns", "qwen3-rslora-patterns", "alpha0-pattern", "embeddings"])
def test_llama_cpp_applies_peft_delta(bases: dict[str, Path], tmp_path: Path, model_type: str, lora: dict) -> None:
    base = bases[model_type]
    adapter = _peft_adapter(base, tmp_path / "adapter", **lora)
    report = convert_to_gguf(GgufConvertConfig(adapter=adapter, out=tmp_path / "a.gguf", base=base))
    fields, tensors = _read(tmp_path / "a.gguf")
    assert (fields["general.architecture"], report.architecture) == (model_type, model_type)
    assert fields["adapter.lora.alpha"] == lora["lora_alpha"]
    deltas = _peft_deltas(base, adapter)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if model_type == "llama" else gguf.MODEL_ARCH.QWEN3, 2)
    assert len(tensors) == 2 * len(deltas) == 2 * report.modules
    for module, want in deltas.items():
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if model_type == "llama" and module.endswith(("q_proj", "k_proj")):  # llama.cpp's rotary row order
            heads = TINY["num_attention_heads"] if module.endswith("q_proj") else TINY["num_key_value_heads"]
            want = want[_llama_rows(heads, TINY["head_dim"])]
        got = torch.from_numpy(_llama_cpp_delta(fields, tensors, name))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=module)
    plain = lora["lora_alpha"] and not lora.get("use_rslora") and not lora.get("alpha_pattern")
    assert (report.folded == 0) == bool(plain)
    # PEFT saved copies of the embedding layers beside their LoRAs: the base's own weights, left out
    assert ("embed_tokens" in lora["target_modules"]) == any("2 copies of base layers" in n for n in report.notes)


def test_names_are_gguf_tensor_name_maps() -> None:
    modules = ["model.embed_tokens", "lm_head", *(f"model.layers.{i}.{p}" for i in (0, 3) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"))]
    for architecture, arch in [("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA), ("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA),
                               ("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2), ("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3)]:
        base = GgufBase.from_config({**TINY, "num_hidden_layers": 4, "architectures": [architecture]}, source="config.json")
        names = gguf.get_tensor_name_map(arch, 4)
        assert base.architecture == gguf.MODEL_ARCH_NAMES[arch]
        for module in modules:
            assert gguf_target(module, base).tensor == names.get_name(f"{module}.weight", try_suffixes=(".weight",))


# --- refusals -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{case: (adapter, base)} that --to gguf must refuse."""
    root = tmp_path_factory.mktemp("gguf-refused")
    llama = bases["llama"]
    plain = _peft_adapter(llama, root / "plain", r=2, target_modules=["q_proj"])

    def base_with(name: str, **changes: Any) -> Path:
        (root / name).mkdir()
        config = json.loads((llama / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **changes}))
        return root / name

    ia3 = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama),
                              peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    ia3.save_pretrained(root / "ia3")
    loha = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama),
                               peft.LoHaConfig(r=2, alpha=4, target_modules=["v_proj"]))
    loha.save_pretrained(root / "loha")
    return {
        "dora": (_peft_adapter(llama, root / "dora", r=2, target_modules=["q_proj"], use_dora=True), llama),
        "modules-to-save": (_peft_adapter(llama, root / "mts", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                            llama),
        "bias": (_peft_adapter(llama, root / "bias", r=2, target_modules=["q_proj"], lora_bias=True), llama),
        "ia3": (root / "ia3", llama),
        "loha": (root / "loha", llama),
        "alora": (_edit_config(plain, root / "alora", alora_invocation_tokens=[5, 6]), llama),
        "architecture": (plain, base_with("bert", architectures=["BertModel"])),
        "tied-embeddings": (_peft_adapter(llama, root / "emb", r=2, target_modules=["embed_tokens"]),
                            base_with("tied", tie_word_embeddings=True)),
        "wrong-base": (plain, base_with("wide", hidden_size=64, head_dim=16)),
        "no-config": (plain, root / "ia3"),
        "resized-vocabulary": (_with_tensor(plain, root / "resized", "base_model.model.model.embed_tokens.base_layer.weight",
                                            torch.zeros(130, 32)), llama),
    }


REFUSALS = [
    ("dora", r"dora: module model\.layers\.0\.self_attn\.q_proj is DoRA \(lora_magnitude_vector\), whose rescaling "
             r"llama\.cpp cannot apply; merge the adapter into its base instead"),
    ("modules-to-save", r"mts: tensor base_model\.model\.lm_head\.weight is a full weight \(modules_to_save or trainable "
                        r"tokens\), which llama\.cpp's LoRA loader cannot apply; merge"),
    ("bias", r"bias: module model\.layers\.0\.self_attn\.q_proj is a LoRA with lora_B\.bias \(lora_bias\), which "
             r"llama\.cpp cannot apply"),
    ("ia3", r"ia3: module model\.layers\.0\.self_attn\.k_proj is IA3, which rescales weights"),
    ("architecture", r"bert/config\.json: architecture BertModel is not supported by --to gguf; it supports "
                     r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM$"),
    ("tied-embeddings", r"emb: module model\.embed_tokens: the base ties its embeddings to lm_head, and llama\.cpp would "
                        r"apply this LoRA to its output layer too"),
    ("wrong-base", r"plain: module model\.layers\.0\.self_attn\.q_proj fits a \[32, 32\] weight but the base's "
                   r"blk\.0\.attn_q\.weight is \[64, 64\] by its config\.json; is it the right base\?"),
    ("no-config", r"ia3: has no config\.json; --base must be the base model's folder or Hub id"),
    ("resized-vocabulary", r"resized: tensor base_model\.model\.model\.embed_tokens\.base_layer\.weight is a \[130, 32\] "
                           r"copy of a base layer but the base's vocabulary is \[128, 32\]: a resized vocabulary"),
    ("loha", r"loha: module model\.layers\.0\.self_attn\.v_proj is LOHA, not LoRA factors; re-factor the adapter as a "
             r"LoRA first \(adaptertool convert ADAPTER LORA --rank R\)$"),
    ("alora", r"alora: is an activated LoRA \(alora_invocation_tokens\); --to gguf writes plain LoRAs"),
]


@pytest.mark.parametrize(("case", "message"), REFUSALS, ids=[case for case, _ in REFUSALS])
def test_refusals_are_one_line_and_write_nothing(refused: dict[str, tuple[Path, Path]], tmp_path: Path, case: str,
                                                 message: str) -> None:
    adapter, base = refused[case]
    result = CliRunner().invoke(cli, ["convert", str(adapter), str(tmp_path / "out.gguf"), "--to", "gguf", "--base", str(base)])
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_base_comes_from_the_adapter_config_or_is_asked_for(bases: dict[str, Path], tmp_path: Path) -> None:
    base = bases["llama"]
    adapter = _peft_adapter(base, tmp_path / "ad", r=2, target_modules=["v_proj"])  # PEFT records the base's path
    report = convert_to_gguf(GgufConvertConfig(adapter=adapter, out=tmp_path / "a.gguf"))
    assert report.base_config == str(base / "config.json")
    orphan = _edit_config(adapter, tmp_path / "orphan", base_model_name_or_path=None)
    with pytest.raises(AdapterToolError, match="adapter_config.json has no base_model_name_or_path; pass --base BASE"):
        convert_to_gguf(GgufConvertConfig(adapter=orphan, out=tmp_path / "b.gguf"))
    elsewhere = _edit_config(adapter, tmp_path / "moved", base_model_name_or_path="/no/such/base")
    with pytest.raises(AdapterToolError, match="base_model_name_or_path /no/such/base is not a folder here .*; pass --base"):
        convert_to_gguf(GgufConvertConfig(adapter=elsewhere, out=tmp_path / "b.gguf"))


# --- the command line -------------------------------------------------------------------------------


def test_cli_json_force_and_options(bases: dict[str, Path], tmp_path: Path) -> None:
    adapter = _peft_adapter(bases["qwen3"], tmp_path / "ad", r=4, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "adapter.gguf"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(adapter), str(out), "--to", "gguf", "--dtype", "bf16", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["architecture"], report["modules"], report["ranks"], report["dtype"]) == ("qwen3", 4, [4], "BF16")
    assert report["file_bytes"] == out.stat().st_size
    assert {kind for kind, _, _ in _read(out)[1].values()} == {"BF16"}
    result = runner.invoke(cli, ["convert", str(adapter), str(out), "--to", "gguf"])
    assert result.exit_code == 1 and "already exists; pass --force" in result.stderr
    result = runner.invoke(cli, ["convert", str(adapter), str(out), "--to", "gguf", "--force"])
    assert result.exit_code == 0 and result.stdout.startswith(f"wrote {out} (GGUF LoRA for llama.cpp, architecture qwen3")
    assert {kind for kind, _, _ in _read(out)[1].values()} == {"F32"}  # auto: the adapter's float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "adapter.gguf"]  # nothing staged is left
    (tmp_path / "folder").mkdir()
    result = runner.invoke(cli, ["convert", str(adapter), str(tmp_path / "folder"), "--to", "gguf", "--force"])
    assert result.exit_code == 1 and "folder is a folder, and this output is one file" in result.stderr
    result = runner.invoke(cli, ["convert", str(adapter), str(tmp_path / "x.gguf"), "--to", "gguf", "--rank", "2"])
    assert result.exit_code == 1 and "--to gguf writes ADAPTER as it is and does not combine with --rank" in result.stderr
    result = runner.invoke(cli, ["convert", str(adapter), str(tmp_path / "x"), "--export", "--base", str(bases["qwen3"])])
    assert result.exit_code == 1 and "--base names the base for --to gguf" in result.stderr


def test_a_failed_write_leaves_no_output(bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = _peft_adapter(bases["llama"], tmp_path / "ad", r=2, target_modules=["q_proj"])

    def broken(path: Path, *args: Any, **kwargs: Any) -> int:
        path.write_bytes(b"GGUF half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("adaptertool.ops.convert_gguf.write_gguf_lora", broken)
    with pytest.raises(AdapterToolError, match="a.gguf not written: no space left on its disk"):
        _convert(adapter, tmp_path / "a.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


# --- SmolLM2 against llama.cpp's converter and llama.cpp ----------------------------------------------


@pytest.fixture(scope="module")
def smollm2_files(smollm2: Path, llama_cpp_converter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PEFT LoRA on the real SmolLM2 (r=8, alpha 16, every projection) and its GGUF files: ours and the converter's."""
    root = tmp_path_factory.mktemp("smollm2-gguf")
    adapter = _peft_adapter(smollm2, root / "adapter", seed=3, r=8, lora_alpha=16, target_modules=PROJECTIONS)
    return {"adapter": adapter, "ours": _convert(adapter, root / "ours.gguf"),
            "theirs": _llama_cpp_convert(llama_cpp_converter, smollm2, adapter, root / "theirs.gguf")}


@pytest.mark.slow
def test_same_file_as_llama_cpps_converter(smollm2_files: dict[str, Path]) -> None:
    fields = _read(smollm2_files["ours"])[0]
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora", "llama")
    _assert_same_file(smollm2_files["ours"], smollm2_files["theirs"])


@pytest.mark.slow
def test_same_bf16_file_as_llama_cpps_converter(smollm2: Path, smollm2_files: dict[str, Path], llama_cpp_converter: Path,
                                                tmp_path: Path) -> None:
    ours = _convert(smollm2_files["adapter"], tmp_path / "ours.gguf", dtype=torch.bfloat16)
    _assert_same_file(ours, _llama_cpp_convert(llama_cpp_converter, smollm2, smollm2_files["adapter"],
                                               tmp_path / "theirs.gguf", "bf16"))


@pytest.mark.slow
def test_same_file_as_llama_cpps_converter_with_embeddings(bases: dict[str, Path], llama_cpp_converter: Path,
                                                           tmp_path: Path) -> None:
    # Qwen3 (no rotary reordering), untied, with LoRAs on embed_tokens and lm_head: the other layouts.
    adapter = _peft_adapter(bases["qwen3"], tmp_path / "ad", r=4, lora_alpha=8,
                            target_modules=["embed_tokens", "lm_head", "q_proj", "k_proj", "up_proj"])
    _assert_same_file(_convert(adapter, tmp_path / "ours.gguf"),
                      _llama_cpp_convert(llama_cpp_converter, bases["qwen3"], adapter, tmp_path / "theirs.gguf"))


def _greedy(base_gguf: Path, lora: Path | None, tokens: int = 16) -> list[int]:
    """llama.cpp's greedy continuation of PROMPT, as token ids."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from source)")
    model = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, n_ctx=64, n_threads=1,
                            seed=0, verbose=False)
    out = []
    for token in model.generate(model.tokenize(PROMPT), top_k=1, temp=0.0):
        out.append(token)
        if len(out) == tokens:
            return out
    return out


@pytest.mark.slow
def test_llama_cpp_generates_with_ours_as_with_the_converters(smollm2_files: dict[str, Path], smollm2_gguf: Path,
                                                              tmp_path: Path) -> None:
    plain = _greedy(smollm2_gguf, None)
    theirs = _greedy(smollm2_gguf, smollm2_files["theirs"])
    assert theirs != plain  # the adapter changes what the model says
    assert _greedy(smollm2_gguf, smollm2_files["ours"]) == theirs
    # The same delta as an rsLoRA adapter (alpha / sqrt(r) == 16 / 8): our file folds the scaling into B, so
    # llama.cpp says the same; the converter would apply alpha / r to it, a third of the strength.
    rslora = _edit_config(smollm2_files["adapter"], tmp_path / "rslora", use_rslora=True, lora_alpha=2 * math.sqrt(8))
    assert _greedy(smollm2_gguf, _convert(rslora, tmp_path / "rslora.gguf")) == theirs
