"""The reader: headers only on open, lazy bit-exact reads, one-line errors for every bad input."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptertool import AdapterToolError
from adaptertool.io import open_checkpoint

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 10).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=generator).to(dtype)


def test_reads_every_dtype_bit_exact(tmp_path: Path) -> None:
    # The oracle is the safetensors library itself: what it wrote, we read back identically.
    tensors = {f"t{i}": _random(dt, (3, 5) if i % 2 else (7,), i) for i, dt in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, tmp_path / "x.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as ckpt:
        assert set(ckpt) == set(tensors)
        for name, expected in tensors.items():
            got = ckpt.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got.view(torch.uint8) if got.dim() else got.reshape(1).view(torch.uint8),
                               expected.view(torch.uint8) if expected.dim() else expected.reshape(1).view(torch.uint8))


def test_sharded_folder_lists_tensors_from_headers(tiny_sharded: Path) -> None:
    with open_checkpoint(tiny_sharded) as ckpt:
        assert ckpt.index is not None and len(ckpt.files) > 2
        index = json.loads(ckpt.index.read_text())["weight_map"]
        assert set(ckpt) == set(index)
        for name in index:
            assert ckpt[name].file.name == index[name]
        # a lazy read equals what safetensors loads from the same shard
        name = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(ckpt.read(name), load_file(tiny_sharded / index[name])[name])


def test_index_file_and_single_file_paths(tiny_models: dict, tiny_sharded: Path) -> None:
    with open_checkpoint(tiny_sharded / "model.safetensors.index.json") as ckpt:
        assert ckpt.root == tiny_sharded
    single = tiny_models[("fp16", False)] / "model.safetensors"
    with open_checkpoint(single) as ckpt:
        assert ckpt.root is None and ckpt.files == [single]


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _single(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(8)}, path)
    return path


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(AdapterToolError, match=r"nope does not exist; check the path"):
        open_checkpoint(tmp_path / "nope")


def test_truncated_header(tmp_path: Path) -> None:
    path = _single(tmp_path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(AdapterToolError, match=r"m\.safetensors: header length \d+ is larger than the file \(20 bytes\)"):
        open_checkpoint(path)


def test_file_shorter_than_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(AdapterToolError, match=r"only 2 bytes, too short"):
        open_checkpoint(path)


def test_truncated_data(tmp_path: Path) -> None:
    path = _single(tmp_path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(AdapterToolError, match=r"m\.safetensors: truncated: tensor b ends at byte \d+ but the file has \d+"):
        open_checkpoint(path)


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": 1}')
    with pytest.raises(AdapterToolError, match=r"header length 10000 is larger than the file"):
        open_checkpoint(path)


def test_corrupt_header_json(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    body = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0\0\0\0")
    with pytest.raises(AdapterToolError, match=r"m\.safetensors: header is not valid JSON"):
        open_checkpoint(path)


def test_shape_disagrees_with_offsets(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    body = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(12))
    with pytest.raises(AdapterToolError, match=r"tensor w is F32\[2, 2\] \(16 bytes\) but its offsets span 12 bytes"):
        open_checkpoint(path)


def test_duplicate_key_in_one_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    body = f'{{"w": {entry}, "w": {entry}}}'.encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(4))
    with pytest.raises(AdapterToolError, match=r"tensor w appears twice in the header"):
        open_checkpoint(path)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is plain text and not a checkpoint at all")
    with pytest.raises(AdapterToolError, match=r"notes\.safetensors: not a safetensors file"):
        open_checkpoint(path)


class _Bomb:
    def __reduce__(self) -> tuple:
        raise AssertionError("never pickled")


@pytest.mark.parametrize("how", ["torch-zip", "legacy-pickle"])
def test_pickle_is_refused_never_loaded(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pytorch_model.bin"
    if how == "torch-zip":
        torch.save({"w": torch.ones(2)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    # Make any unpickling attempt fail loudly: refusing must not depend on trying.
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(AdapterToolError, match=r"pytorch_model\.bin is a pickle; adaptertool never unpickles"):
        open_checkpoint(path)
    with pytest.raises(AdapterToolError, match=r"holds only pickled weights \(pytorch_model\.bin\)"):
        open_checkpoint(tmp_path)


def test_pickle_renamed_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(AdapterToolError, match=r"is a pickle"):
        open_checkpoint(path)


@pytest.mark.parametrize("length", [640, 896, 1152, 1408])
def test_header_lengths_that_start_like_a_pickle_are_safetensors(tmp_path: Path, length: int) -> None:
    # Little-endian 640..1408 begins 0x80 0x02..0x05: pickle's PROTO opcode, but byte 8 is "{".
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (length - len(header))  # the format allows trailing spaces
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + header + struct.pack("<2f", 1.0, 2.0))
    with open_checkpoint(path) as ckpt:
        assert ckpt.read("w").tolist() == [1.0, 2.0]
    assert load_file(path)["w"].tolist() == [1.0, 2.0]


def test_index_names_missing_shard(tiny_sharded: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_sharded, tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(AdapterToolError, match=rf"index\.json: names shard {victim.name}, which is missing"):
        open_checkpoint(folder)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(AdapterToolError, match=r"tensor b appears in both s1\.safetensors and s2\.safetensors"):
        open_checkpoint(tmp_path)


def test_index_disagrees_with_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index = {"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(AdapterToolError, match=r"maps tensor a to s2\.safetensors, which does not hold it, and it is in s1\.safetensors, "
                       r"which the index does not name"):
        open_checkpoint(tmp_path)


def test_tensor_missing_from_index(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "extra": torch.ones(1)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(AdapterToolError, match=r"tensor extra is not listed in model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)


def test_index_shard_path_escape_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(AdapterToolError, match=r"is not a plain file name"):
        open_checkpoint(tmp_path)


def test_folder_with_several_unindexed_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"b": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(AdapterToolError, match=r"several \.safetensors files .* but no index; pass one file"):
        open_checkpoint(tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(AdapterToolError, match=r"holds no \.safetensors file"):
        open_checkpoint(tmp_path)


def test_every_checkpoint_tensor_is_copyable(tiny_sharded: Path) -> None:
    with open_checkpoint(tiny_sharded) as ckpt:
        assert all(ckpt.copyable(name) for name in ckpt)
