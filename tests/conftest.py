"""Shared fixtures: tiny deterministic Llama checkpoints, built once per session."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from pytest import CollectReport, TestReport

from adaptertool.ops.examples import TINY, LlamaShape, write_llama, write_lora_adapter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The owning libraries the tests compare against (the test extra). Without them the suite's
# pytest.importorskip calls would skip some 30 modules and tests quietly and the run would pass
# having compared nothing, so a missing or broken oracle fails the run instead.
ORACLES = ("peft", "transformers", "bitsandbytes", "compressed_tensors")
INSTALL = "pip install -c constraints.txt -e '.[test]'"
_ORACLE_SKIP = re.compile(r"(?:Skipped: )?could not import '((%s)(?:\.[\w.]+)?)': (.*)" % "|".join(ORACLES))


def pytest_configure(config: pytest.Config) -> None:
    # find_spec only looks the packages up: importing them all costs seconds that a run of one
    # test file should not pay. A package that is present but fails to import is caught where a
    # test imports it (the two hooks below).
    missing = [name for name in ORACLES if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"test oracles not installed: {', '.join(missing)}; run: {INSTALL}")


def _fail_oracle_skip(report: CollectReport | TestReport) -> None:
    """Turn an importorskip skip on a missing or broken oracle into a failure that names the fix."""
    if not (report.skipped and isinstance(report.longrepr, tuple)):
        return
    found = _ORACLE_SKIP.match(report.longrepr[2])
    if found is not None:
        module, _, error = found.groups()
        report.outcome = "failed"
        report.longrepr = f"test oracle {module} could not be imported ({error}); run: {INSTALL}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, CollectReport, CollectReport]:
    report = yield  # a module-level importorskip skips the whole module here
    _fail_oracle_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, TestReport, TestReport]:
    report = yield  # an importorskip inside a test or fixture
    _fail_oracle_skip(report)
    return report


# Hugging Face settings a user may have exported (offline mode, a token, another cache or endpoint).
_HF_VARIABLES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE")


@pytest.fixture(autouse=True)
def _no_user_hugging_face_settings(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test sees a clean Hugging Face environment with an empty HF_HOME of its own.

    Without this, HF_HUB_OFFLINE=1, HF_TOKEN, HF_HOME, HF_HUB_CACHE or HF_ENDPOINT in the user's shell
    change what the Hub tests see (13 of them failed so). huggingface_hub reads these variables once,
    into ``huggingface_hub.constants``, when it is first imported, so changing os.environ is not
    enough: its constants are recomputed from the cleaned environment and patched for the test.
    """
    for key in list(os.environ):
        if key.upper().startswith(_HF_VARIABLES):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is None:
        return  # not imported yet: it will read the environment set above
    spec = importlib.util.spec_from_file_location("_huggingface_hub_constants_now", constants.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # the module only reads os.environ (standard library imports)
    for name, value in vars(fresh).items():
        if name.isupper() and getattr(constants, name, value) != value:
            monkeypatch.setattr(constants, name, value)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    """{(dtype name, sharded): folder} for bf16/fp16/fp32, single-file and 3+ shards."""
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for name, dtype in DTYPES.items():
        for sharded in (False, True):
            out = root / f"{name}-{'sharded' if sharded else 'single'}"
            write_llama(out, TINY, dtype=dtype, max_shard_bytes=12_000 if sharded else None)
            models[(name, sharded)] = out
    return models


@pytest.fixture(scope="session")
def tiny_sharded(tiny_models: dict[tuple[str, bool], Path]) -> Path:
    return tiny_models[("bf16", True)]


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora_adapter(tmp_path_factory.mktemp("adapter") / "lora", TINY, rank=4, alpha=8.0)


def _builder(name: str = "build_real_models") -> ModuleType:
    # fixtures/ is a folder of scripts, not a package: load a builder from its path.
    path = Path(__file__).resolve().parents[1] / "fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct: bf16, 3 shards + index + tokenizer (built once, cached)."""
    builder = _builder()
    return builder.build("smollm2", builder.default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_tuned(smollm2: Path) -> Path:
    """A short real full fine-tune of ``smollm2`` (AdamW on every parameter), saved like it (cached)."""
    builder = _builder()
    return builder.build("smollm2-tuned", builder.default_cache_dir())


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    """The real Gemma 3 270M (Gemma3ForCausalLM): bf16, 3 shards + index + tokenizer, from a Q4_K_M GGUF (cached)."""
    builder = _builder()
    return builder.build("gemma3-270m", builder.default_cache_dir())


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file ``smollm2`` is converted from (cached): a base llama.cpp loads."""
    builder = _builder()
    return builder.smollm2_gguf(builder.default_cache_dir())


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """llama.cpp's convert_lora_to_gguf.py, with what it imports, from llama-cpp-python's source distribution
    (cached); skips where pip cannot download it."""
    builder = _builder()
    try:
        return builder.build("llama-cpp-converter", builder.default_cache_dir())
    except subprocess.CalledProcessError as err:
        name, version = builder.LLAMA_CPP_SDIST
        pytest.skip(f"llama.cpp's converter is not available: pip download {name}=={version} failed ({err})")


@pytest.fixture(scope="session")
def moe_fixtures() -> Path:
    """Tiny MoE models (fixtures/build_moe.py): ``<family>/{per-expert,fused}/``, ``<family>/adapters/<name>/``
    and ``<family>/oracles/<name>/`` (PEFT's float32 merge of that adapter); cached, a fresh build takes seconds."""
    return _builder("build_moe").build()


@pytest.fixture(scope="session")
def fp8_fixtures() -> Path:
    """Tiny FP8 / MXFP4 models (fixtures/build_fp8.py): ``manifest.json`` and per case
    ``<case>/{quantized,bf16,adapter}/`` (block FP8 incl. partial edge blocks and ue8m0, compressed-tensors
    FP8, gpt-oss MXFP4; each with its bf16 original and a LoRA made against it); cached."""
    return _builder("build_fp8").build()


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2: one float32 BERT file with config and tokenizer (cached)."""
    builder = _builder()
    return builder.build("minilm", builder.default_cache_dir())


TINY_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "log", "and", "what", "did", "do", "?"]
TINY_SPECIAL = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny float32 Llama whose vocabulary is a word-level tokenizer's, with train/eval JSONL."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("train")
    vocab = {t: i for i, t in enumerate(TINY_SPECIAL + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(TINY_SPECIAL)
    base = root / "base"
    write_llama(base, LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=len(vocab)),
                dtype=torch.float32)
    (base / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}), encoding="utf-8")
    r = random.Random(0)
    for name, n in (("train", 48), ("eval", 12)):
        with (root / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                animal = r.choice(["cat", "dog"])
                f.write(json.dumps({"prompt": f"what did the {animal} do ?",
                                    "completion": "sat on the mat" if animal == "cat" else "ran on a log"}) + "\n")
    return {"root": root, "base": base, "train": root / "train.jsonl", "eval": root / "eval.jsonl"}
