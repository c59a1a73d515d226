"""A scratch spool: tensors computed before their output's layout is known, parked on disk.

A safetensors header lists every tensor's size before any data, and a shard stores its tensors in
the writer's order, not the order they are computed in. A pipeline whose outputs' sizes depend on
the computation (extract's ranks, quantize's quant_state lengths) therefore computes each tensor
once into a spool, then writes the output in the writer's order, copying the spooled bytes in
kernel space. The spool is an anonymous file beside the output (same filesystem, gone when closed
or when the process dies) and a :class:`~adaptertool.io.source.TensorSource`, so the writer copies
from it as from a checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from adaptertool.io.format import TensorSpec, dtype_code
from adaptertool.io.reader import copy_range, read_range, write_all
from adaptertool.io.source import TensorInfo, TensorTable

if TYPE_CHECKING:
    import torch

__all__ = ["TensorSpool"]


class TensorSpool(TensorTable):
    """Tensors appended one by one to an anonymous file in ``folder``, read or copied back by name."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder  # for messages: the spool's file has no name
        self.root: Path | None = None  # no side files
        self.metadata: dict[str, str] = {}
        self._file: BinaryIO = tempfile.TemporaryFile(dir=folder, buffering=0)  # noqa: SIM115  (closed by close())
        self._end = 0
        self.tensors: dict[str, TensorInfo] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any device) under ``name``; its spec is its dtype and shape."""
        import torch

        spec = TensorSpec(name, dtype_code(tensor.dtype), tuple(tensor.shape))
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.seek(self._end)
        write_all(self._file, memoryview(data.numpy()))
        self.tensors[name] = TensorInfo(spec, self.path, self._end)
        self._end += spec.nbytes

    def drop(self, name: str) -> None:
        """Forget tensor ``name``; once none is left the file is emptied, so the spool's disk is that
        of the tensors pending at one time, not of all it ever held."""
        del self.tensors[name]
        if not self.tensors:
            self._file.truncate(0)
            self._end = 0

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return read_range(self._file, self.tensors[name], buffer=buffer)

    def copyable(self, name: str) -> bool:
        return True

    def copy_bytes(self, name: str, dst: BinaryIO) -> None:
        copy_range(self._file, dst, self.tensors[name])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
