"""The one copy-or-cast loop: produced tensors written, same-spec tensors copied, the rest cast."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adaptertool.io import TensorSpec, TensorSpool, cast_specs, open_checkpoint
from adaptertool.ops.stream import stream_checkpoint


def test_produce_copy_and_cast(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    source = {
        "a": torch.randn(4, 3, generator=g).to(torch.bfloat16),  # cast to float32
        "b": torch.randn(5, generator=g, dtype=torch.float64),  # cast: F64 is a float too
        "c": torch.arange(6, dtype=torch.int64),  # not a float: copied
        "d": torch.randn(2, 2, generator=g),  # produced
        "e": torch.randn(3, generator=g),  # produced from a spool
    }
    save_file(source, tmp_path / "in.safetensors")
    spooled = torch.randn(3, generator=g)
    made = torch.full((2, 2), 7.0)
    out = tmp_path / "out"
    out.mkdir()
    with open_checkpoint(tmp_path / "in.safetensors") as ckpt, TensorSpool(tmp_path / "scratch") as spool:
        spool.add("e", spooled)
        hooks = {"d": made, "e": spool}
        done = stream_checkpoint(ckpt, out, cast_specs(ckpt.specs(), "F32"), max_shard_bytes=None,
                                 metadata={"format": "pt"}, produce=lambda spec: hooks.get(spec.name),
                                 desc="test", progress=False)
    assert (done.produced, done.copied, done.cast) == (2, 1, 2)
    assert done.files == ["model.safetensors"]
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["a"], source["a"].float())
    assert torch.equal(got["b"], source["b"].float())
    assert torch.equal(got["c"], source["c"])
    assert torch.equal(got["d"], made) and torch.equal(got["e"], spooled)
    assert done.bytes_written == sum(t.numel() * t.element_size() for t in got.values())


def test_same_spec_is_copied_not_decoded(tmp_path: Path) -> None:
    # A NaN payload survives only a byte copy that never goes through arithmetic.
    nan = torch.tensor([float("nan")], dtype=torch.float32).view(torch.int32) | 1
    save_file({"x": nan.view(torch.float32)}, tmp_path / "in.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    with open_checkpoint(tmp_path / "in.safetensors") as ckpt:
        done = stream_checkpoint(ckpt, out, ckpt.specs(), max_shard_bytes=None, metadata={"format": "pt"},
                                 desc="test", progress=False)
    assert (done.produced, done.copied, done.cast) == (0, 1, 0)
    assert torch.equal(load_file(out / "model.safetensors")["x"].view(torch.int32), nan)


def test_specs_decide_the_layout(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(100), "b": torch.zeros(100)}, tmp_path / "in.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    with open_checkpoint(tmp_path / "in.safetensors") as ckpt:
        done = stream_checkpoint(ckpt, out, [TensorSpec("a", "F32", (100,)), TensorSpec("b", "F32", (100,))],
                                 max_shard_bytes=400, metadata={"format": "pt"}, desc="test", progress=False)
    assert done.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (out / "model.safetensors.index.json").is_file()
