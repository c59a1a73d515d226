"""Streaming sharded safetensors writer.

Every command knows its output tensors' names, dtypes and shapes before it computes any of them
(plan first), so the writer lays out all shards and headers up front and then streams each tensor's
bytes straight to its file: one tensor in memory at a time, whatever the model's size.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from adaptertool.errors import OptionError, OutputError
from adaptertool.io.format import DTYPES, TensorSpec, build_header, dtype_code
from adaptertool.io.reader import write_all

if TYPE_CHECKING:
    import torch

    from adaptertool.io.source import TensorSource

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "CheckpointWriter", "parse_size"]

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # huggingface_hub's default max_shard_size ("5GB")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Parse a byte size such as ``"5GB"`` (10**9 units, as huggingface_hub) or ``"500MiB"``; 0 is allowed."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise OptionError(f"size {text!r} is not understood; write it like 5GB, 500MB or 2GiB")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


class CheckpointWriter:
    """Write tensors into ``directory`` as safetensors shards, streamed one tensor at a time.

    Shards are filled greedily in the order of ``specs`` up to ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own), as huggingface_hub does. Inside a shard, tensors are stored
    by descending element size then name, so every tensor starts aligned to its element size.
    Tensors must be supplied in :attr:`order`. One shard is named ``{stem}.safetensors``; several
    are ``{stem}-0000i-of-0000N.safetensors`` plus ``{stem}.safetensors.index.json``.
    """

    def __init__(self, directory: Path, specs: Iterable[TensorSpec], *,
                 max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES, stem: str = "model",
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.stem = stem
        self.metadata = {"format": "pt"} if metadata is None else metadata
        self.shards = _split(list(specs), max_shard_bytes)
        self.order: list[TensorSpec] = [spec for shard in self.shards for spec in shard]
        if len({spec.name for spec in self.order}) != len(self.order):
            raise ValueError("duplicate tensor names in the writer's plan")
        self._shard_of = [i for i, shard in enumerate(self.shards) for _ in shard]
        self._next = 0  # index into self.order
        self._shard = -1
        self._file: BinaryIO | None = None
        self._expected_size = 0
        self._open = False  # set by __enter__: without the with-block nothing would write the index

    @property
    def files(self) -> list[Path]:
        n = len(self.shards)
        if n == 1:
            return [self.directory / f"{self.stem}.safetensors"]
        return [self.directory / f"{self.stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.order)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (on any device; moved to the CPU) as the next tensor of the plan."""
        spec = self._advance(name)
        if dtype_code(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: got {tensor.dtype}{list(tensor.shape)}, planned {spec.dtype}{list(spec.shape)}")
        out = self._out()
        if spec.nbytes:
            import torch

            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            write_all(out, memoryview(data.numpy()))

    def copy(self, name: str, source: TensorSource) -> None:
        """Append tensor ``name`` byte for byte from ``source``: no decode, no rounding (``source.copyable(name)``)."""
        spec = self._advance(name)
        if source[name].spec != spec:
            raise ValueError(f"{name}: source is {source[name].spec}, planned {spec}")
        source.copy_bytes(name, self._out())

    def close(self) -> list[Path]:
        """Finish the last shard and write the index; returns the files written."""
        if self._next != len(self.order):
            missing = self.order[self._next].name
            raise ValueError(f"writer closed before tensor {missing} was written")
        self._finish_shard()
        # An empty plan still yields a valid (empty) checkpoint file.
        if not self.order:
            self.files[0].write_bytes(build_header([], self.metadata))
        if len(self.shards) > 1:
            weight_map = {spec.name: file.name for file, shard in zip(self.files, self.shards, strict=True) for spec in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.directory / f"{self.stem}.safetensors.index.json").write_text(text, encoding="utf-8")
        return self.files

    def abort(self) -> None:
        """Close the open file without finishing it (the caller discards the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CheckpointWriter:
        self._check_space()
        self._open = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check_space(self) -> None:
        """Refuse up front a plan that cannot fit on the disk, rather than fail when it is full.

        Raises:
            OSError: ENOSPC, with what the output needs; :func:`~adaptertool.io.staging.staged_output`
                names OUT in the message.
        """
        free = shutil.disk_usage(self.directory).free
        if free < self.total_bytes:
            raise OSError(errno.ENOSPC, f"the output needs {self.total_bytes:,} bytes and {free:,} are free")

    def _advance(self, name: str) -> TensorSpec:
        if not self._open:
            raise ValueError("use CheckpointWriter as a context manager: closing it finishes the shards and index")
        if self._next >= len(self.order) or self.order[self._next].name != name:
            expected = self.order[self._next].name if self._next < len(self.order) else "nothing"
            raise ValueError(f"tensor {name} written out of order; the writer expects {expected}")
        spec = self.order[self._next]
        self._next += 1
        return spec

    def _out(self) -> BinaryIO:
        # Open the shard the last-advanced tensor belongs to, finishing the previous one.
        shard = self._shard_of[self._next - 1]
        if shard != self._shard:
            self._finish_shard()
            self._shard = shard
            header = build_header(self.shards[shard], self.metadata)
            self._expected_size = len(header) + sum(spec.nbytes for spec in self.shards[shard])
            self._file = open(self.files[shard], "wb", buffering=0)
            write_all(self._file, memoryview(header))
        assert self._file is not None
        return self._file

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        written = self._file.tell()
        self._file.close()
        self._file = None
        if written != self._expected_size:
            raise OutputError(
                f"{self.files[self._shard]}: wrote {written} bytes, expected {self._expected_size}; is the disk full?"
            )


def _split(specs: list[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and max_shard_bytes is not None and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [sorted(shard, key=lambda s: (-DTYPES[s.dtype][0], s.name)) for shard in shards]

