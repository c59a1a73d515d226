"""What a streaming pipeline reads tensors from: a checkpoint, or a view that stands for one.

:class:`~adaptertool.io.reader.Checkpoint` is one; a 4-bit checkpoint seen as the 16-bit model it
encodes is another (its quantised weights decode when read). Pipelines typed against this protocol
take either without asking which it is. :class:`TensorTable` holds what every one of them shares:
the names and specs, kept as :class:`TensorInfo` in storage order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from adaptertool.io.format import TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = ["TensorInfo", "TensorSource", "TensorTable"]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its spec, its file and its absolute byte offset there."""

    spec: TensorSpec
    file: Path
    offset: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.spec.shape

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


class TensorSource(Protocol):
    """Named tensors with specs from headers, read one at a time."""

    @property
    def path(self) -> Path:
        """What the user named: a file or folder, for messages."""

    @property
    def root(self) -> Path | None:
        """The folder whose side files (config.json...) go with the tensors; None for a bare file."""

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata."""

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def __getitem__(self, name: str) -> TensorInfo:
        """The spec (dtype and shape as read) of tensor ``name``."""

    def specs(self) -> list[TensorSpec]:
        """Every tensor's spec, in storage order."""

    def read(self, name: str, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor of its spec; ``buffer`` (uint8) may be reused for the bytes."""

    def copyable(self, name: str) -> bool:
        """Whether tensor ``name``'s stored bytes are the tensor, so :meth:`copy_bytes` may copy them."""

    def copy_bytes(self, name: str, dst: BinaryIO) -> None:
        """Append tensor ``name``'s stored bytes to ``dst``; only where :meth:`copyable` says so."""


class TensorTable:
    """The lookups every tensor source answers from its table ``tensors`` (name -> TensorInfo)."""

    tensors: dict[str, TensorInfo]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def specs(self) -> list[TensorSpec]:
        return [info.spec for info in self.tensors.values()]
