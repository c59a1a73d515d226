"""The command line: exit codes, stdout holding only the result, one-line errors, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from adaptertool.cli import cli


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_info_json_is_one_object(tiny_sharded: Path) -> None:
    code, out, err = _run("info", str(tiny_sharded), "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["format"] == "sharded safetensors"
    assert report["tensors"] == 21 and report["parameters"] == 26784
    assert report["dtypes"] == {"BF16": 21} and report["architecture"] == "LlamaForCausalLM"
    assert report["adapter"] is None


def test_info_adapter(tiny_adapter: Path) -> None:
    code, out, _ = _run("info", str(tiny_adapter), "--json")
    adapter = json.loads(out)["adapter"]
    assert code == 0
    assert adapter["peft_type"] == "LORA" and adapter["rank"] == 4 and adapter["ranks"] == [4]
    assert adapter["targets"] == ["q_proj", "v_proj"] and adapter["modules"] == 4
    code, out, _ = _run("info", str(tiny_adapter))
    assert "adapter LORA r=4" in out and "targets q_proj, v_proj (4 modules)" in out


def test_verify_ok_and_nan_scan(tiny_sharded: Path, tmp_path: Path) -> None:
    code, out, _ = _run("verify", str(tiny_sharded), "--nan")
    assert code == 0 and out.startswith("ok: ") and "no NaN/Inf" in out
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])}, tmp_path / "bad.safetensors")
    code, out, err = _run("verify", str(tmp_path / "bad.safetensors"), "--nan")
    assert code == 1 and out == ""
    assert err.strip() == f"error: {tmp_path / 'bad.safetensors'}: tensor w holds 1 NaN and 2 Inf values"


def test_verify_total_size_mismatch(tiny_sharded: Path, tmp_path: Path) -> None:
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_sharded, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = _run("verify", str(folder))
    assert code == 1 and "metadata.total_size is" in err and len(err.strip().splitlines()) == 1


def test_error_is_one_line_exit_1_without_traceback(tmp_path: Path) -> None:
    code, out, err = _run("info", str(tmp_path / "missing"))
    assert code == 1 and out == ""
    assert err == f"error: {tmp_path / 'missing'} does not exist; check the path\n"


def test_debug_shows_traceback(tmp_path: Path) -> None:
    code, _, err = _run("--debug", "info", str(tmp_path / "missing"))
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("does not exist; check the path")


def test_usage_error_exits_2() -> None:
    code, _, err = _run("reshard", "only-one-arg")
    assert code == 2 and "Missing argument" in err
    code, _, _ = _run("reshard", "a", "b", "--dtype", "int4")
    assert code == 2


def test_reshard_cli(tiny_sharded: Path, tmp_path: Path) -> None:
    code, out, _ = _run("reshard", str(tiny_sharded), str(tmp_path / "o"), "--max-shard-size", "0", "--json")
    report = json.loads(out)
    assert code == 0 and report["files"] == ["model.safetensors"] and report["copied"] == 21
    code, _, err = _run("reshard", str(tiny_sharded), str(tmp_path / "o"))
    assert code == 1 and "already exists; pass --force" in err
    assert (tmp_path / "o" / "config.json").read_bytes() == (tiny_sharded / "config.json").read_bytes()


def test_reshard_dtype_rewrites_the_config_dtype(tiny_sharded: Path, tmp_path: Path) -> None:
    # docs/commands/reshard.md: with --dtype the config names the stored dtype, as transformers reads it.
    from transformers import AutoConfig

    code, _, err = _run("reshard", str(tiny_sharded), str(tmp_path / "o"), "--dtype", "fp16")
    assert code == 0, err
    assert str(AutoConfig.from_pretrained(tmp_path / "o").dtype) == "torch.float16"
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"


def test_demo_runs_and_module_entry_point(tmp_path: Path) -> None:
    # python -m adaptertool is the same CLI as the console script.
    done = subprocess.run([sys.executable, "-m", "adaptertool", "demo", str(tmp_path / "demo")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "merged it: 4 weights changed, 17 copied byte for byte" in done.stdout
    assert "max abs error" in done.stdout
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()


def test_header_only_commands_do_not_import_torch(tiny_sharded: Path) -> None:
    # info/verify read headers only; importing torch would add seconds of start-up to every call.
    code = (
        "import sys; from adaptertool.cli import cli; "
        f"cli(['info', {str(tiny_sharded)!r}], standalone_mode=False); "
        f"cli(['verify', {str(tiny_sharded)!r}], standalone_mode=False); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_merge_and_subtract_cli(tmp_path: Path) -> None:
    import torch

    from adaptertool.ops.examples import TINY, write_llama, write_lora_adapter

    base = tmp_path / "base"
    write_llama(base, TINY, dtype=torch.float32)
    write_lora_adapter(tmp_path / "lora", TINY)
    code, out, err = _run("merge", str(base), str(tmp_path / "lora"), str(tmp_path / "m"), "--add", f"{tmp_path / 'lora'}:-1", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["adapters"] == [str(tmp_path / "lora")] * 2 and report["merged"] == 4
    # +1 and -1 of the same adapter cancel to within float32 rounding
    from adaptertool.io import open_checkpoint
    with open_checkpoint(base) as a, open_checkpoint(tmp_path / "m") as b:
        assert max((a.read(n) - b.read(n)).abs().max().item() for n in a) < 1e-6
    code, out, _ = _run("subtract", str(tmp_path / "m"), str(tmp_path / "lora"), str(tmp_path / "s"), "--dtype", "bf16")
    assert code == 0 and out.startswith("subtracted 1 adapter(s) into") and "4 tensors changed, 17 cast to bfloat16;" in out
    code, _, err = _run("merge", str(base), str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert code == 1 and err == f"error: {tmp_path / 'nothing'} does not exist; check the adapter path\n"


def test_threads_default_to_one_and_are_taken_after_the_command(tiny_sharded: Path, tiny_adapter: Path,
                                                                tmp_path: Path) -> None:
    # The console script itself, in a fresh process: one thread unless asked (benchmarks/bench_threads.py),
    # except train, which keeps torch's one per core; --threads and --debug work after the command too.
    code = (
        "import os, sys; from adaptertool.cli import main; sys.argv = ['adaptertool', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "import torch; print(torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    merge = ["merge", str(tiny_sharded), str(tiny_adapter)]
    torch_default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=environ,
                                   capture_output=True, text=True, check=True).stdout.strip()
    for args, expected in ((["info", str(tiny_sharded)], "1 1"), ([*merge, str(tmp_path / "a"), "-q"], "1 1"),
                           ([*merge, str(tmp_path / "b"), "-q", "--threads", "2", "--debug"], "2 2"),
                           (["train", "--help"], f"{torch_default} None")):
        done = subprocess.run([sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == expected, (args, done.stdout)
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()