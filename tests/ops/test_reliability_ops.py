"""Issue 18, ops layer: every number that reaches the merge arithmetic is checked before anything is
written, hostile configs are one line (exit 1) and never a traceback, an adapter that changes
nothing is refused, and merge --requantize's scratch carries what a later run needs to clean it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adaptertool.cli import cli
from adaptertool.errors import AdapterToolError
from adaptertool.ops.combine import CombineConfig
from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter
from adaptertool.ops.merge import MergeConfig, merge


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reliability") / "base"
    write_llama(folder, TINY, dtype=torch.float32, max_shard_bytes=30_000)
    return folder


def _adapter(folder: Path, raw: str | None = None, **changes: object) -> Path:
    """A LoRA adapter whose adapter_config.json has ``changes``, or ``raw`` JSON text in place of r's value."""
    write_lora_adapter(folder, TINY)
    config = json.loads((folder / "adapter_config.json").read_text())
    text = json.dumps({**config, **changes})
    if raw is not None:
        text = text.replace(f'"r": {config["r"]}', f'"r": {raw}')
    (folder / "adapter_config.json").write_text(text)
    return folder


def _cli_error(*args: str) -> str:
    """Run the CLI; it must exit 1 with one ``error:`` line and no traceback. Returns that line."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


# --- Bug 1 and r: 4.7 -----------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number within float32's range, got nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number within float32's range, got inf"),
    ({"lora_alpha": 1e39}, r"lora_alpha must be a finite number within float32's range, got 1e\+39"),
    ({"lora_alpha": "8"}, "lora_alpha must be a finite number within float32's range, got '8'"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
    ({"alpha_pattern": {"q_proj": -float("inf")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
    ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be a positive whole number, got 2\.5"),
    ({"r": 4.7}, r"r must be a positive whole number, got 4\.7"),  # was truncated to 4
    ({"r": True}, "r must be a positive whole number, got True"),
    ({"r": 0}, "r must be a positive whole number, got 0"),
    ({"rank_pattern": {"q_proj(": 2}}, r"rank_pattern key 'q_proj\(' is not a valid regular expression \(missing \)"),
    ({"alpha_pattern": {"[": 2}}, r"alpha_pattern key '\[' is not a valid regular expression"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object of module pattern -> value, got a JSON array"),
    ({"modules_to_save": 5}, "modules_to_save must be a list of module names, got 5"),
])
def test_bad_numbers_in_adapter_config_are_refused_before_writing(base: Path, tmp_path: Path, changes: dict[str, object],
                                                                   message: str) -> None:
    adapter = _adapter(tmp_path / "lora", **changes)
    with pytest.raises(AdapterToolError, match=rf"adapter_config\.json: {message}"):
        merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("raw", "message"), [
    ("1e400", "r must be a positive whole number, got inf"),  # was OverflowError
    ("4" * 5000, r"cannot be read as JSON \(an integer of 5000 digits\)"),  # was Python's int limit ValueError
    ("[" * 50_000 + "]" * 50_000, r"cannot be read as JSON \(nested too deeply\)"),  # was RecursionError
    ("4.0", None),  # a whole number written as a float is that number
])
def test_hostile_r_values_are_one_line(base: Path, tmp_path: Path, raw: str, message: str | None) -> None:
    adapter = _adapter(tmp_path / "lora", raw=raw)
    args = ["merge", str(base), str(adapter), str(tmp_path / "out")]
    if message is None:
        assert CliRunner().invoke(cli, args).exit_code == 0
        return
    line = _cli_error(*args)
    assert line.startswith(f"error: {adapter / 'adapter_config.json'}: ") and re.search(message, line), line


def test_a_deeply_nested_config_json_is_one_line(base: Path, tmp_path: Path) -> None:
    folder = tmp_path / "base"
    write_llama(folder, TINY, dtype=torch.float32)
    (folder / "config.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    line = _cli_error("merge", str(folder), str(adapter), str(tmp_path / "out"))
    assert line == f"error: {folder / 'config.json'}: cannot be read as JSON (nested too deeply)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("scale", "weight", "message"), [
    (float("nan"), 1.0, "--scale must be a finite number within float32's range"),
    (float("inf"), 1.0, "--scale must be a finite number"),
    (1e39, 1.0, r"--scale must be a finite number within float32's range \(\+-3\.4e38\), not 1e\+39"),  # was a RuntimeError
    (1.0, float("nan"), "the weight of .*lora must be a finite number"),
    (1e30, 1e30, r"the weight of .*lora times --scale must be a finite number within float32's range"),
])
def test_scale_and_weights_are_checked(base: Path, tmp_path: Path, scale: float, weight: float, message: str) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    with pytest.raises(AdapterToolError, match=message):
        MergeConfig(base=base, adapters=((adapter, weight),), out=tmp_path / "out", scale=scale)


def test_scale_and_add_weights_on_the_command_line(base: Path, tmp_path: Path) -> None:
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    out = str(tmp_path / "out")
    assert "--scale must be a finite number" in _cli_error("merge", str(base), str(adapter), out, "--scale", "1e39")
    assert "--scale must be a finite number" in _cli_error("merge", str(base), str(adapter), out, "--scale", "nan")
    line = _cli_error("merge", str(base), str(adapter), out, "--add", f"{adapter}:1e39")
    assert f"the weight of {adapter} must be a finite number within float32's range" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("weights", "message"), [
    ((1e39, 1.0), r"--weights must be a finite number within float32's range \(\+-3\.4e38\), not 1e\+39"),
    ((float("nan"), 1.0), "finite numbers"),
])
def test_combine_weights_are_checked(tmp_path: Path, weights: tuple[float, float], message: str) -> None:
    with pytest.raises(AdapterToolError, match=message):
        CombineConfig(adapters=(tmp_path / "a", tmp_path / "b"), out=tmp_path / "out", weights=weights)
    with pytest.raises(AdapterToolError, match="--density must lie in"):
        CombineConfig(adapters=(tmp_path / "a",), out=tmp_path / "out", method="ties", density=float("nan"))


# --- Bug 7: an adapter that changes nothing -------------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj"], None])
def test_an_adapter_without_tensors_is_refused(base: Path, tmp_path: Path, targets: list[str] | None) -> None:
    adapter = _adapter(tmp_path / "lora", target_modules=targets)
    save_file({}, adapter / "adapter_model.safetensors")
    matched = r'its target_modules \["q_proj"\] matched no module' if targets else "it targets no module"
    with pytest.raises(AdapterToolError, match=rf"lora: the adapter holds no tensors \({matched} when it was saved\); "
                                               "there is nothing to merge"):
        merge(MergeConfig(base=base, adapters=((adapter, 1.0),), out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- Bug 3: merge --requantize's scratch ----------------------------------------------------------


def test_requantize_scratch_is_named_for_stale_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptertool.ops import quantize as quantize_module

    write_llama(tmp_path / "base", TINY, dtype=torch.bfloat16)
    quantize_module.quantize(quantize_module.QuantConfig(source=tmp_path / "base", out=tmp_path / "nf4"))
    adapter = write_lora_adapter(tmp_path / "lora", TINY)
    scratch: list[str] = []
    real = quantize_module.quantize

    def spy(cfg: quantize_module.QuantConfig, **kwargs: object) -> object:
        scratch.append(cfg.source.parent.name)
        return real(cfg, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize", spy)
    merge(MergeConfig(base=tmp_path / "nf4", adapters=((adapter, 1.0),), out=tmp_path / "m4", requantize=True))
    assert len(scratch) == 1 and scratch[0].startswith(f".m4.adaptertool-{os.getpid()}-merge16-")
    assert not [p for p in tmp_path.iterdir() if ".adaptertool-" in p.name]
