"""The Python API (adaptertool/api): every function on tiny inputs, its report, its error kinds, its progress
bars, its keywords against the CLI's options, and the examples of docs/api.md and README.md."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import adaptertool as at
from adaptertool.cli import cli
from adaptertool.ops.combine import CombineReport
from adaptertool.ops.convert import ConvertReport
from adaptertool.ops.convert_gguf import GgufConvertReport
from adaptertool.ops.dequantize import DequantReport
from adaptertool.ops.extract import ExtractReport
from adaptertool.ops.info import InfoReport
from adaptertool.ops.init import InitReport
from adaptertool.ops.merge import MergeReport
from adaptertool.ops.quantize import QuantReport
from adaptertool.ops.reshard import ReshardReport
from adaptertool.ops.train import TrainReport
from adaptertool.ops.verify import VerifyReport
from tests.hub.fake_hub import TOKEN, FakeHub

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's folder: base/ (float32, two shards), adapter/ (rank-4 LoRA), merged/."""
    out = tmp_path_factory.mktemp("api") / "demo"
    report = at.demo(out)
    assert report.max_abs_error < 1e-6
    return out


def test_import_adaptertool_is_cheap(demo: Path) -> None:
    # Every function loads on first use: the package, and info and verify (headers only), never import torch.
    code = ("import sys, adaptertool as at; assert callable(at.merge) and callable(at.train); "
            f"at.info({str(demo / 'base')!r}); at.verify({str(demo / 'base')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_every_command_has_a_function_named_as_it() -> None:
    assert set(cli.commands) <= set(at.__all__)
    assert {"InputError", "OptionError", "OutputError", "HubError", "ProcessError"} <= set(at.__all__)


def test_keywords_are_the_cli_options_with_their_defaults() -> None:
    # One surface: the CLI's arguments are the positional parameters, in order, and each option's long name in
    # snake_case is a keyword-only one, default included.
    rendering = {"as_json", "quiet", "out_option"}  # the CLI's own: output modes, combine's -o alias of OUT
    for name, command in cli.commands.items():
        params = inspect.signature(getattr(at, name)).parameters
        positional = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert positional == [p.name for p in command.params if isinstance(p, click.Argument)], name
        for option in command.params:
            if isinstance(option, click.Argument) or option.name in rendering:
                continue
            keyword = max(option.opts, key=len).removeprefix("--").replace("-", "_")
            keyword = {"quant_type": "format"}.get(keyword, keyword)
            assert keyword in params, f"{name}: --{keyword} has no keyword"
            if isinstance(option, click.Option) and option.default is not None and not option.multiple:
                default = params[keyword].default
                assert str(default) == str(option.default), f"{name} {keyword}: {default!r} != {option.default!r}"


def test_merge_and_subtract(demo: Path, tmp_path: Path) -> None:
    report = at.merge(demo / "base", str(demo / "adapter") + ":0.5", tmp_path / "m", add=[(demo / "adapter", 0.5)],
                      max_shard_size=0, progress=False)
    assert isinstance(report, MergeReport)
    assert report.merged == 4 and report.files == ["model.safetensors"] and len(report.adapters) == 2
    back = at.subtract(demo / "merged", demo / "adapter", tmp_path / "s", dtype="bf16", progress=False)
    assert isinstance(back, MergeReport) and back.dtype == "bfloat16" and back.merged == 4


def test_the_cli_prints_the_api_report(demo: Path) -> None:
    result = CliRunner().invoke(cli, ["info", str(demo / "adapter"), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads(json.dumps(dataclasses.asdict(at.info(demo / "adapter"))))


def test_info_verify_reshard(demo: Path, tmp_path: Path) -> None:
    info = at.info(str(demo / "base"))
    assert isinstance(info, InfoReport) and info.architecture == "LlamaForCausalLM" and len(info.files) == 2
    check = at.verify(demo / "merged", nan=True, progress=False)
    assert isinstance(check, VerifyReport) and check.ok and check.scanned
    one = at.reshard(demo / "base", tmp_path / "one", max_shard_size="0", dtype="fp16", progress=False)
    assert isinstance(one, ReshardReport) and one.files == ["model.safetensors"] and one.cast == one.tensors


def test_extract_init_combine_convert(demo: Path, tmp_path: Path) -> None:
    lora = at.extract(demo / "base", demo / "merged", tmp_path / "x", rank=4, report=tmp_path / "r.json", progress=False)
    assert isinstance(lora, ExtractReport) and lora.rank == 4 and lora.rel_error < 1e-4
    assert (tmp_path / "r.json").is_file()
    fresh = at.init(demo / "base", tmp_path / "i", rank=2, targets=["q_proj"], dora=True, progress=False)
    assert isinstance(fresh, InitReport) and fresh.modules == 2 and fresh.target_modules == ["q_proj"]
    mixed = at.combine([f"{demo / 'adapter'}:0.5", tmp_path / "x"], tmp_path / "c", progress=False)
    assert isinstance(mixed, CombineReport) and mixed.weights == [0.5, 1.0]
    by_list = at.combine([demo / "adapter", tmp_path / "x"], tmp_path / "c2", weights=[0.5, 1.0], progress=False)
    assert by_list.weights == mixed.weights
    small = at.convert(demo / "adapter", tmp_path / "r2", rank=2, progress=False)
    assert isinstance(small, ConvertReport) and small.rank == 2 and small.steps == ["resize"]
    gguf = at.convert(demo / "adapter", tmp_path / "a.gguf", to="gguf", base=demo / "base", progress=False)
    assert isinstance(gguf, GgufConvertReport) and gguf.architecture == "llama" and gguf.modules == 4


def test_quantize_and_dequantize(demo: Path, tmp_path: Path) -> None:
    nf4 = at.quantize(demo / "base", tmp_path / "q", blocksize="32", skip=["v_proj"], progress=False)
    assert isinstance(nf4, QuantReport) and nf4.quant_type == "nf4" and nf4.blocksize == 32 and nf4.quantized == 12
    fp8 = at.quantize(demo / "base", tmp_path / "f", format="fp8-block", block="16x16", progress=False)
    assert fp8.quant_type == "fp8-block" and fp8.block == [16, 16]
    plain = at.dequantize(tmp_path / "q", tmp_path / "d", dtype="fp32", progress=False)
    assert isinstance(plain, DequantReport) and plain.dequantized == 12


def test_train(tiny: dict[str, Path], tmp_path: Path) -> None:
    report = at.train(tiny["base"], tiny["train"], tmp_path / "t", eval=tiny["eval"], rank=4, max_steps=2, batch_size=4,
                      seq_len=32, device="cpu", progress=False)
    assert isinstance(report, TrainReport) and report.steps == 2 and report.eval_loss is not None


def test_progress_false_draws_no_bar_and_true_does(demo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    at.reshard(demo / "base", tmp_path / "a", progress=False)
    at.reshard(demo / "base", tmp_path / "b")  # None: stderr is not a terminal here
    assert capfd.readouterr().err == ""
    at.reshard(demo / "base", tmp_path / "c", progress=True)
    assert "reshard" in capfd.readouterr().err


def test_progress_default_is_on_in_a_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptertool.api.arguments import progress_on

    assert progress_on(None) is False  # pytest captures stderr: not a terminal
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", sys)  # what tqdm.auto takes for a notebook kernel
    assert progress_on(None) is True and progress_on(False) is False


@pytest.mark.parametrize(("call", "kind", "message"), [
    # merge, subtract
    pytest.param(lambda d, t: at.merge(d / "base", t / "none", t / "o"), at.InputError, "none does not exist", id="merge-InputError"),
    pytest.param(lambda d, t: at.merge(d / "base", d / "adapter", t / "o", scale=float("nan")), at.OptionError, "--scale must be", id="merge-OptionError"),
    pytest.param(lambda d, t: at.merge(d / "base", d / "adapter", t / "o", dtype="int4"), at.OptionError, "--dtype must be one of", id="merge-OptionError2"),
    pytest.param(lambda d, t: at.merge(d / "base", d / "adapter", d / "merged"), at.OutputError, "already exists; pass --force", id="merge-OutputError"),
    pytest.param(lambda d, t: at.subtract(d / "adapter", d / "base", t / "o"), at.InputError, "are they swapped", id="subtract-InputError"),
    # extract, init, combine, convert
    pytest.param(lambda d, t: at.extract(d / "base", t / "none", t / "o"), at.InputError, "does not exist", id="extract-InputError"),
    pytest.param(lambda d, t: at.extract(d / "base", d / "merged", t / "o", energy=0.9, auto_rank=True), at.OptionError, "two rank rules", id="extract-OptionError"),
    pytest.param(lambda d, t: at.extract(d / "base", d / "merged", t / "o", targets=["nope"]), at.OptionError, "--targets nope matches no", id="extract-OptionError2"),
    pytest.param(lambda d, t: at.extract(d / "base", d / "merged", d / "base" / "x"), at.OutputError, "overlaps input", id="extract-OutputError"),
    pytest.param(lambda d, t: at.init(d / "base", t / "o", method="pissa"), at.OptionError, "give --residual-base", id="init-OptionError"),
    pytest.param(lambda d, t: at.init(t / "none", t / "o"), at.InputError, "does not exist", id="init-InputError"),
    pytest.param(lambda d, t: at.init(d / "base", d / "adapter"), at.OutputError, "already exists", id="init-OutputError"),
    pytest.param(lambda d, t: at.combine([f"{d / 'adapter'}:1", d / "adapter"], t / "o", weights="1,1"), at.OptionError, "not both", id="combine-OptionError"),
    pytest.param(lambda d, t: at.combine([d / "adapter", d / "base"], t / "o"), at.InputError, "adapter_config.json", id="combine-InputError"),
    pytest.param(lambda d, t: at.combine([d / "adapter"], d / "adapter", force=True), at.OutputError, "overlaps input", id="combine-OutputError"),
    pytest.param(lambda d, t: at.convert(d / "adapter", t / "o", to="onnx"), at.OptionError, "--to must be one of peft, gguf", id="convert-OptionError"),
    pytest.param(lambda d, t: at.convert(d / "adapter", t / "o.gguf", to="gguf", rank=2), at.OptionError, "does not combine with --rank", id="convert-OptionError2"),
    pytest.param(lambda d, t: at.convert(d / "base", t / "o", rank=2), at.InputError, "adapter_config.json", id="convert-InputError"),
    pytest.param(lambda d, t: at.convert(d / "adapter", d / "merged", rank=2), at.OutputError, "already exists", id="convert-OutputError"),
    # quantize, dequantize, reshard, info, verify
    pytest.param(lambda d, t: at.quantize(d / "base", t / "o", format="int3"), at.OptionError, "--format must be one of", id="quantize-OptionError"),
    pytest.param(lambda d, t: at.quantize(d / "base", t / "o", block="12"), at.OptionError, "not ROWSxCOLS", id="quantize-OptionError2"),
    pytest.param(lambda d, t: at.quantize(d / "base", t / "o", blocksize="big"), at.OptionError, "--blocksize must be", id="quantize-OptionError3"),
    pytest.param(lambda d, t: at.quantize(d / "merged", d / "base"), at.OutputError, "already exists", id="quantize-OutputError"),
    pytest.param(lambda d, t: at.dequantize(d / "base", t / "o"), at.InputError, "holds no quantised weights", id="dequantize-InputError"),
    pytest.param(lambda d, t: at.reshard(d / "base", t / "o", max_shard_size="lots"), at.OptionError, "is not understood", id="reshard-OptionError"),
    pytest.param(lambda d, t: at.reshard(d / "base", d / "merged"), at.OutputError, "already exists", id="reshard-OutputError"),
    pytest.param(lambda d, t: at.info(t / "none"), at.InputError, "does not exist; check the path", id="info-InputError"),
    pytest.param(lambda d, t: at.verify(d / "adapter" / "adapter_config.json"), at.InputError, "adapter_config.json", id="verify-InputError"),
    # train, pull, push
    pytest.param(lambda d, t: at.train(d / "base", t / "x.jsonl", t / "o", devices=2), at.OptionError, "torchrun", id="train-OptionError"),
    pytest.param(lambda d, t: at.train(d / "base", t / "x.jsonl", d / "merged"), at.OutputError, "already exists", id="train-OutputError"),
    pytest.param(lambda d, t: at.train(d / "base", t / "x.jsonl", t / "o"), at.InputError, "has no tokenizer.json",
                 id="train-InputError"),
    pytest.param(lambda d, t: at.train(d / "base", t / "x.jsonl", t / "o", lr=0), at.OptionError, "--lr must be positive",
                 id="train-OptionError-lr"),
    pytest.param(lambda d, t: at.pull("me/na..me"), at.OptionError, "is not a Hub id", id="pull-OptionError"),
    pytest.param(lambda d, t: at.push(d / "base", "me/na..me"), at.OptionError, "is not a Hub id", id="push-OptionError"),
    pytest.param(lambda d, t: at.push(t / "none", "me/x"), at.InputError, "is not a folder", id="push-InputError"),
    pytest.param(lambda d, t: at.merge("me/na..me", d / "adapter", t / "o"), at.OptionError, "is not a Hub id", id="merge-OptionError3"),
])
def test_error_kinds(call, kind: type[at.AdapterToolError], message: str, demo: Path, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(kind, match=re.escape(message)):
        call(demo, tmp_path)
    assert not (tmp_path / "o").exists()


def test_a_kind_is_caught_as_itself_and_as_the_base(demo: Path, tmp_path: Path) -> None:
    try:
        at.reshard(demo / "base", tmp_path / "o", dtype="int8")
    except at.OptionError as err:
        assert isinstance(err, ValueError) and isinstance(err, at.AdapterToolError)
        assert str(err) == "--dtype must be one of bf16, fp16, fp32, not 'int8'"
    else:
        raise AssertionError("no OptionError")


def _hub_env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    # huggingface_hub reads these when imported: the API runs in a fresh process pointed at the fake Hub.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGING", "HTTP_PROXY", "HTTPS_PROXY"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.fixture
def hub() -> FakeHub:
    server = FakeHub()
    server.start()
    yield server  # type: ignore[misc]
    server.close()


def test_hub_errors(hub: FakeHub, tmp_path: Path) -> None:
    # Every command family resolves a Hub id the same way, and fails the same way.
    code = (
        "import adaptertool as at\n"
        "for call in (lambda: at.pull('me/missing'), lambda: at.info('me/missing'),\n"
        "             lambda: at.merge('me/missing', 'me/lora', 'o'), lambda: at.extract('me/missing', 'me/t', 'o'),\n"
        "             lambda: at.convert('me/missing', 'o.gguf', to='gguf'), lambda: at.quantize('me/missing', 'o')):\n"
        "    try:\n        call()\n    except at.HubError as err:\n        print('HubError:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_hub_env(hub, tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6 and lines[0].startswith("HubError: me/missing: no such repo")
    assert all(line.startswith("HubError: me/missing is neither a local path nor a Hub repo") for line in lines[1:])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("page", ["docs/api.md", "README.md"])
def test_docs_python_examples_run(page: str, hub: FakeHub, tmp_path: Path) -> None:
    # A page's python blocks, in order, in one folder where the demo ran; the Hub ones against a fake Hub.
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= (12 if page == "docs/api.md" else 1)
    script = tmp_path / "examples.py"
    script.write_text("import adaptertool as at\nat.demo('adaptertool-demo')\n" + "\n".join(blocks), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], env=_hub_env(hub, tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    if page == "docs/api.md":
        assert "error: no-such-adapter does not exist; check the adapter path" in done.stdout
        assert done.stderr == ""  # progress=False everywhere: no bars, no notes
