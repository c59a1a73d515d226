"""The writer: exact bytes, greedy sharding, aligned layout, files safetensors and transformers read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from adaptertool.errors import AdapterToolError
from adaptertool.io import DTYPES as FORMAT_DTYPES
from adaptertool.io import (
    CheckpointWriter,
    TensorSpec,
    dtype_code,
    open_checkpoint,
    parse_size,
    torch_dtype,
)
from adaptertool.ops.reshard import ReshardConfig, reshard
from tests.conftest import DTYPES


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("max_shard_bytes", [None, 7_000, 10**9], ids=["one-file", "7KB-shards", "1GB-shards"])
def test_round_trip_is_bit_identical(tiny_models: dict, tmp_path: Path, dtype: str, sharded: bool,
                                     max_shard_bytes: int | None) -> None:
    source = tiny_models[(dtype, sharded)]
    out = tmp_path / "out"
    report = reshard(ReshardConfig(source=source, out=out, max_shard_bytes=max_shard_bytes))
    assert report.copied == report.tensors and report.cast == 0
    with open_checkpoint(source) as before, open_checkpoint(out) as after:
        assert set(before) == set(after)
        for name in before:
            assert after[name].spec == before[name].spec
            assert torch.equal(_raw(after.read(name)), _raw(before.read(name))), name
    assert (out / "config.json").read_bytes() == (source / "config.json").read_bytes()
    if max_shard_bytes == 7_000:
        assert len(report.files) > 5 and (out / "model.safetensors.index.json").is_file()
    if max_shard_bytes is None:
        assert report.files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()


def test_shards_fill_greedily_and_index_is_hub_shaped(tmp_path: Path) -> None:
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 1])]  # 40,40,120,20,4 bytes
    with CheckpointWriter(tmp_path, specs, max_shard_bytes=100) as writer:
        for spec in writer.order:
            writer.write(spec.name, torch.full(spec.shape, float(spec.shape[0])))
    # greedy in plan order: [t0 t1] [t2 (alone, larger than the budget)] [t3 t4]
    assert [[s.name for s in shard] for shard in writer.shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 224}
    assert index["weight_map"] == {
        "t0": "model-00001-of-00003.safetensors", "t1": "model-00001-of-00003.safetensors",
        "t2": "model-00002-of-00003.safetensors", "t3": "model-00003-of-00003.safetensors",
        "t4": "model-00003-of-00003.safetensors",
    }
    for file in index["weight_map"].values():
        with safe_open(tmp_path / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), torch.full(f.get_tensor(name).shape, float(f.get_tensor(name).shape[0])))


def test_layout_is_aligned_and_header_padded(tmp_path: Path) -> None:
    # An odd-sized U8 tensor before a float32 one would misalign it if stored in plan order.
    specs = [TensorSpec("blob", "U8", (7,)), TensorSpec("w", "F32", (3,)), TensorSpec("h", "F16", (3,))]
    tensors = {"blob": torch.arange(7, dtype=torch.uint8), "w": torch.tensor([1.0, 2.0, 3.0]),
               "h": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)}
    with CheckpointWriter(tmp_path, specs, max_shard_bytes=None) as writer:
        for spec in writer.order:
            writer.write(spec.name, tensors[spec.name])
    data = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    for name, entry in header.items():
        if name != "__metadata__":
            itemsize = {"F32": 4, "F16": 2, "U8": 1}[entry["dtype"]]
            assert (8 + length + entry["data_offsets"][0]) % itemsize == 0
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_output_is_deterministic(tiny_sharded: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        reshard(ReshardConfig(source=tiny_sharded, out=tmp_path / run, max_shard_bytes=9_000))
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_dtype_cast_rounds_once(tiny_models: dict, tmp_path: Path) -> None:
    source = tiny_models[("fp32", True)]
    report = reshard(ReshardConfig(source=source, out=tmp_path / "o", dtype=torch.bfloat16))
    assert report.cast == report.tensors
    with open_checkpoint(source) as before, open_checkpoint(tmp_path / "o") as after:
        for name in before:
            assert torch.equal(after.read(name), before.read(name).to(torch.bfloat16))


def test_writer_refuses_out_of_order_and_wrong_shape(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    writer = CheckpointWriter(tmp_path, specs, max_shard_bytes=None)
    with pytest.raises(ValueError, match="use CheckpointWriter as a context manager"):
        writer.write("a", torch.ones(2))
    writer.__enter__()
    with pytest.raises(ValueError, match="out of order"):
        writer.write("b", torch.ones(2))
    with pytest.raises(ValueError, match="planned F32"):
        writer.write("a", torch.ones(3))
    writer.abort()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("123") == 123
    assert parse_size("0GB") == 0
    for bad in ("", "-1GB", "5 parsecs", "GB"):
        with pytest.raises(Exception, match="not understood"):
            parse_size(bad)


# Every dtype torch defines; safetensors' own torch binding decides which have a code.
TORCH_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def _safetensors_code(dtype: torch.dtype) -> tuple[str, int] | None:
    """(header dtype, bytes per element) that safetensors.torch.save writes for ``dtype``; None if it refuses."""
    try:
        data = save({"t": torch.empty(4, dtype=dtype)})
    except KeyError:  # safetensors.torch has no code for this dtype
        return None
    (size,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8:8 + size])["t"]
    start, end = entry["data_offsets"]
    return entry["dtype"], (end - start) // 4


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=[str(d).removeprefix("torch.") for d in TORCH_DTYPES])
def test_dtype_codes_match_safetensors(dtype: torch.dtype) -> None:
    # Oracles: the header safetensors.torch writes, and torch's own itemsize.
    written = _safetensors_code(dtype)
    if written is None or written[0] not in FORMAT_DTYPES:
        # Not in our table (sub-byte ints, quantised, FNUZ floats, F4): refused, never guessed.
        with pytest.raises(AdapterToolError, match="has no safetensors code"):
            dtype_code(dtype)
        return
    code, itemsize = written
    assert dtype_code(dtype) == code
    assert torch_dtype(code) is dtype
    assert FORMAT_DTYPES[code][0] == itemsize == torch.empty(0, dtype=dtype).itemsize


def test_every_dtype_code_is_one_safetensors_writes() -> None:
    written = {found[0] for d in TORCH_DTYPES if (found := _safetensors_code(d)) is not None}
    assert set(FORMAT_DTYPES) <= written


def test_reshard_keeps_user_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "m.safetensors", metadata={"format": "pt", "note": "keep me"})
    reshard(ReshardConfig(source=tmp_path / "m.safetensors", out=tmp_path / "out"))
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "keep me"}
