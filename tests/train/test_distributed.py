"""Training on two CPU processes (gloo) under torchrun: DDP and FSDP2 give the single-process
gradients and adapters, resume crosses world sizes, rank 0 alone writes, a killed process ends the
job with one line and an intact checkpoint. Each launch starts two Python processes that import
torch: a few seconds; the cases share launches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptertool.ops.examples import TINY, write_llama
from tests.train import dist_worker

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dist") / "base"
    write_llama(base, TINY, dtype=torch.float32)
    return base


def test_ddp_and_fsdp2_gradients_equal_one_process_on_the_whole_batch(tiny_fp32: Path, tmp_path: Path) -> None:
    worker = Path(dist_worker.__file__)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(worker), str(tiny_fp32), str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for i, case in enumerate(dist_worker.CASES):
        reference, codes = dist_worker.one_step(tiny_fp32, case)
        spread = load_file(tmp_path / f"case{i}.safetensors")
        assert spread.keys() == reference.keys()
        assert any(v.abs().max() > 1e-3 for k, v in reference.items() if "lora_A" in k), "A gradients are all zero"
        worst = max((spread[k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 1e-6, (case, worst)
        ranks = [json.loads((tmp_path / f"codes{i}.rank{r}.json").read_text()) for r in (0, 1)]
        parallel, _, qlora, _ = case
        if qlora and parallel == "fsdp":  # the 4-bit codes are sharded: each process holds half
            assert all(r["local"] <= r["whole"] // 2 + 64 for r in ranks) and ranks[0]["whole"] == codes["whole"]
        elif qlora:  # DDP replicates them
            assert all(r["local"] == r["whole"] == codes["whole"] for r in ranks)


def _train(tiny: dict[str, Path], out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "adaptertool", "train", str(tiny["base"]), str(tiny["train"]), str(out), "--eval",
            str(tiny["eval"]), "--rank", "4", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2", "--dropout", "0",
            "--device", "cpu", "--json", *extra]
    run = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, 4 micro-batches a step, one epoch (the last step takes fewer)."""
    out = tmp_path_factory.mktemp("one") / "adapter"
    _train(tiny, out, "--grad-accum", "4", "--epochs", "1")
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_cli_on_two_processes_trains_the_one_process_adapter(tiny: dict[str, Path], one_process: Path, tmp_path: Path,
                                                             parallel: str) -> None:
    out = tmp_path / "adapter"
    run = _train(tiny, out, "--grad-accum", "2", "--epochs", "1", "--devices", "2", "--parallel", parallel)
    report = json.loads(run.stdout)  # printed once, by rank 0
    single = json.loads((one_process / "train_log.jsonl").read_text().splitlines()[-1])
    assert (report["processes"], report["parallel"], report["steps"]) == (2, parallel, single["step"])
    assert report["tokens"] == single["tokens"]  # the job's tokens: every micro-batch once
    assert _worst(_adapter(out), _adapter(one_process)) < 1e-6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert log[-1]["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # rank 0 wrote it once; checkpoints gone
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), out)
    state = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(state) == len(_adapter(out))


def test_resume_crosses_world_sizes_exactly(tiny: dict[str, Path], tmp_path: Path) -> None:
    steps = ("--max-steps", "6", "--save-every", "2")
    _train(tiny, tmp_path / "two", *steps, "--devices", "2", "--parallel", "fsdp", "--checkpoint-dir", str(tmp_path / "ck2"))
    _train(tiny, tmp_path / "one", *steps, "--grad-accum", "2", "--checkpoint-dir", str(tmp_path / "ck1"))
    assert _worst(_adapter(tmp_path / "two"), _adapter(tmp_path / "one")) < 1e-6
    # 2 processes -> 1 (with --grad-accum 2: the same 4 micro-batches a step), and 1 -> 2 (DDP)
    _train(tiny, tmp_path / "two-one", *steps, "--grad-accum", "2", "--resume", str(tmp_path / "ck2" / "step-000002"))
    _train(tiny, tmp_path / "one-two", *steps, "--devices", "2", "--resume", str(tmp_path / "ck1" / "step-000004"))
    for name in ("two-one", "one-two"):
        assert _worst(_adapter(tmp_path / name), _adapter(tmp_path / "two")) < 1e-6, name
    other = _train(tiny, tmp_path / "wrong", *steps, "--devices", "2", "--grad-accum", "2", "--resume",
                   str(tmp_path / "ck1"), check=False)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: --resume:")
    assert "grad_accum" in lines[0]  # 2 processes x 2 micro-batches is not the checkpoint's 1 x 2


def test_two_nodes_over_loopback_shard_within_and_replicate_across(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The multi-node recipe: two torchrun agents (one process each) meet at a c10d endpoint; with
    --replicate-nodes FSDP2 shards within a node (of 1) and replicates across the two (HSDP)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two-nodes"
    train = ["-m", "adaptertool", "train", str(tiny["base"]), str(tiny["train"]), str(out), "--rank", "4", "--seq-len",
             "16", "--batch-size", "2", "--lr", "1e-2", "--dropout", "0", "--device", "cpu", "--max-steps", "4",
             "--parallel", "fsdp", "--replicate-nodes", "--json"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "loop",
                               *train], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    report = json.loads(next(stdout for stdout, _ in outputs if stdout.strip()))  # rank 0's node alone prints
    assert (report["processes"], report["parallel"]) == (2, "fsdp")
    _train(tiny, tmp_path / "one", "--max-steps", "4", "--grad-accum", "2")
    assert _worst(_adapter(out), _adapter(tmp_path / "one")) < 1e-6


def test_a_killed_process_ends_the_job_with_one_line_and_the_last_checkpoint_loads(tiny: dict[str, Path],
                                                                                   tmp_path: Path) -> None:
    ckpt = tmp_path / "ck"
    args = [sys.executable, "-m", "adaptertool", "train", str(tiny["base"]), str(tiny["train"]), str(tmp_path / "out"),
            "--rank", "4", "--seq-len", "16", "--batch-size", "2", "--max-steps", "100000", "--save-every", "1",
            "--device", "cpu", "--devices", "2", "--checkpoint-dir", str(ckpt), "-q"]
    job = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # steps take milliseconds and the newest two checkpoints are kept: look for any from step 2 on
        while not any(p.name >= "step-000002" for p in ckpt.glob("step-*")):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before its second checkpoint"
            time.sleep(0.1)
        rank1 = next(pid for pid in _children(job.pid) if "LOCAL_RANK=1" in _environ(pid))
        os.kill(rank1, signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: rank 1 (pid {rank1}) was killed by SIGKILL"), err
    last = lines[0].rsplit("--resume ", 1)[1].rstrip(")")
    assert Path(last).parent == ckpt and not (tmp_path / "out").exists()
    from adaptertool.training.state import load_state

    assert load_state(Path(last)).step >= 2


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _environ(pid: int) -> str:
    return Path(f"/proc/{pid}/environ").read_bytes().replace(b"\0", b"\n").decode(errors="replace")
