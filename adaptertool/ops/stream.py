"""The one streamed pass of every pipeline that writes a checkpoint: each output tensor is produced
by the pipeline, or else copied byte for byte from the source, or else read and cast.

Pipelines differ only in their ``produce`` hook (merge's merged weights, init's residuals,
quantize's packed codes, dequantize's expanded weights); the writer, the order, the progress bar
and the copy-or-cast rule are here, once. Torch is imported only when a tensor is cast, so a plain
reshard stays a byte copier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from tqdm.auto import tqdm

from adaptertool.io import CheckpointWriter, TensorSource, TensorSpec, TensorSpool, TensorTable, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["Produce", "SpooledGroups", "Streamed", "stream_checkpoint"]

# spec -> the tensor to write, a source to copy it from byte for byte, or None: copy or cast the source's.
Produce = Callable[[TensorSpec], Union["torch.Tensor", TensorSource, None]]


@dataclass(frozen=True)
class Streamed:
    files: list[str]
    bytes_written: int
    produced: int  # tensors the hook gave
    copied: int  # tensors copied byte for byte from the source
    cast: int  # tensors read from the source and cast (or decoded: a view's non-copyable tensors)


def stream_checkpoint(source: TensorSource, folder: Path, specs: list[TensorSpec], *, max_shard_bytes: int | None,
                      metadata: dict[str, str], produce: Produce | None = None, desc: str, progress: bool,
                      postfix: str | None = None) -> Streamed:
    """Write ``specs`` as a checkpoint in ``folder``, in the writer's order, one tensor in memory at a time.

    ``postfix`` labels the count of produced tensors on the progress bar ("merged").
    """
    writer = CheckpointWriter(folder, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)
    produced = copied = 0
    with writer, tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for spec in writer.order:
            if postfix is not None:
                bar.set_postfix_str(f"{produced} {postfix}", refresh=False)
            made = produce(spec) if produce is not None else None
            if made is None:
                if source.copyable(spec.name) and source[spec.name].spec == spec:
                    writer.copy(spec.name, source)
                    copied += 1
                else:
                    writer.write(spec.name, source.read(spec.name).to(torch_dtype(spec.dtype)))
            else:
                if isinstance(made, TensorTable):  # a source holding this very tensor: a spool
                    writer.copy(spec.name, made)  # type: ignore[arg-type]
                else:
                    writer.write(spec.name, made)
                produced += 1
            bar.update(spec.nbytes)
    return Streamed(files=[f.name for f in writer.files], bytes_written=writer.total_bytes, produced=produced,
                    copied=copied, cast=len(writer.order) - produced - copied)


class SpooledGroups:
    """A ``produce`` hook for tensors made together but written apart, such as a quantised weight's
    codes and scales: the writer orders each shard by dtype size (4-byte scales before 1-byte codes),
    so the first ask for any tensor of a group makes the whole group into ``spool``, later asks copy
    from it, and each tensor is dropped once written. The spool then holds only what is pending.

    ``groups`` maps each output tensor to its group; ``make(group)`` returns {tensor name: tensor}.
    Tensors of no group get None: the stream copies or casts them.
    """

    def __init__(self, spool: TensorSpool, groups: dict[str, str],
                 make: Callable[[str], dict[str, torch.Tensor]]) -> None:
        self.spool, self.groups, self.make = spool, groups, make
        self._written: list[str] = []  # handed to the writer, which has copied them by the next ask

    def __call__(self, spec: TensorSpec) -> TensorSpool | None:
        for name in self._written:
            self.spool.drop(name)
        self._written.clear()
        group = self.groups.get(spec.name)
        if group is None:
            return None
        if spec.name not in self.spool:
            for name, tensor in self.make(group).items():
                self.spool.add(name, tensor)
        self._written.append(spec.name)
        return self.spool
