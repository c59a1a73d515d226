"""The scratch spool: tensors parked in any order come back bit-exact, by read or by kernel copy."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from adaptertool.io import CheckpointWriter, TensorSpool
from tests.io.test_reader import ALL_DTYPES, _random


def test_read_and_copy_back_every_dtype_bit_exact(tmp_path: Path) -> None:
    tensors = {f"t{i}": _random(dt, (3, 5) if i % 2 else (7,), i) for i, dt in enumerate(ALL_DTYPES)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # not contiguous
    scratch = tmp_path / "scratch"
    with TensorSpool(scratch) as spool:
        for name in reversed(tensors):  # computed in one order...
            spool.add(name, tensors[name])
        assert list(scratch.iterdir()) == []  # anonymous: nothing left behind, whatever happens
        for name, expected in tensors.items():
            got = spool.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got.view(torch.uint8), expected.contiguous().view(torch.uint8))
        # ...and written in the writer's order, copied from the spool byte for byte.
        out = tmp_path / "out"
        out.mkdir()
        with CheckpointWriter(out, spool.specs(), max_shard_bytes=None) as writer:
            for spec in writer.order:
                assert spool.copyable(spec.name)
                writer.copy(spec.name, spool)
    loaded = load_file(out / "model.safetensors")
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        assert torch.equal(loaded[name].view(torch.uint8), expected.contiguous().view(torch.uint8))


def test_read_reuses_a_buffer(tmp_path: Path) -> None:
    with TensorSpool(tmp_path) as spool:
        spool.add("a", torch.arange(6, dtype=torch.int16).reshape(2, 3))
        buffer = torch.empty(64, dtype=torch.uint8)
        got = spool.read("a", buffer=buffer)
        assert got.data_ptr() == buffer.data_ptr()
        assert got.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_dropping_every_tensor_empties_the_file(tmp_path: Path) -> None:
    with TensorSpool(tmp_path) as spool:
        spool.add("a", torch.ones(1000))
        spool.add("b", torch.ones(10))
        spool.drop("a")
        assert "a" not in spool and spool.read("b").tolist() == [1.0] * 10
        size = spool._file.seek(0, 2)
        assert size == 4040  # b is still pending: nothing is reclaimed yet
        spool.drop("b")
        assert spool._file.seek(0, 2) == 0
        spool.add("c", torch.arange(3.0))  # written from the start again
        assert spool["c"].offset == 0 and spool.read("c").tolist() == [0.0, 1.0, 2.0]
