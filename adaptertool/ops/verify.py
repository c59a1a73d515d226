"""verify: check a checkpoint's integrity without trusting any of it.

Opening the checkpoint already checks every header (valid JSON, known dtypes, byte sizes that match
shapes, offsets that tile the file exactly) and the index (every shard present, every tensor in the
shard the index names, none missing or repeated). verify adds the index's total_size, shard files the
index forgets, and, with ``nan=True``, a scan of every float tensor for NaN and Inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from adaptertool.adapters.peft_keys import module_order
from adaptertool.io import Checkpoint, open_checkpoint, read_json
from adaptertool.ops.measure import Stopwatch

__all__ = ["NonFinite", "VerifyReport", "verify"]

_SCANNED_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_SCAN_CHUNK = 1 << 24  # elements per NaN/Inf check, to bound the float32 temporaries


@dataclass(frozen=True)
class NonFinite:
    tensor: str
    nan: int
    inf: int


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    path: str
    files: int
    tensors: int
    bytes: int
    scanned: bool
    problems: list[str] = field(default_factory=list)
    nonfinite: list[NonFinite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.nonfinite


def verify(path: Path, *, nan: bool = False, progress: bool = False) -> VerifyReport:
    """Verify the checkpoint at ``path``.

    Raises:
        AdapterToolError: the checkpoint cannot be opened (corrupt, truncated, missing shards...).
    """
    clock = Stopwatch()
    with open_checkpoint(path) as ckpt:
        problems, notes = _index_checks(ckpt)
        nonfinite = _scan(ckpt, progress=progress) if nan else []
        return VerifyReport(
            path=str(path), files=len(ckpt.files), tensors=len(ckpt), bytes=sum(s.nbytes for s in ckpt.specs()),
            scanned=nan, problems=problems, nonfinite=nonfinite, notes=notes, seconds=clock.seconds,
        )


def _index_checks(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    if ckpt.index is None:
        return [], []
    problems, notes = [], []
    total = read_json(ckpt.index).get("metadata", {}).get("total_size")
    actual = sum(spec.nbytes for spec in ckpt.specs())
    if total is not None and total != actual:
        problems.append(f"{ckpt.index}: metadata.total_size is {total} but the shards hold {actual} bytes of tensors")
    listed = {f.name for f in ckpt.files}
    for other in sorted(ckpt.index.parent.glob("*.safetensors")):
        if other.name not in listed:
            notes.append(f"{other} is not named by {ckpt.index.name}; loaders will ignore it")
    return problems, notes


def _scan(ckpt: Checkpoint, *, progress: bool) -> list[NonFinite]:
    import torch  # only the scan needs it; see adaptertool.io.format

    found = []
    total = sum(s.nbytes for s in ckpt.specs() if s.dtype in _SCANNED_CODES)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scan", disable=not progress) as bar:
        for name in ckpt:
            info = ckpt[name]
            if info.dtype not in _SCANNED_CODES:
                continue
            flat = ckpt.read(name).reshape(-1)
            nans = infs = 0
            for start in range(0, flat.numel(), _SCAN_CHUNK):
                chunk = flat[start : start + _SCAN_CHUNK].float()
                nans += int(torch.isnan(chunk).sum())
                infs += int(torch.isinf(chunk).sum())
            if nans or infs:
                found.append(NonFinite(name, nans, infs))
            bar.update(info.nbytes)
    return sorted(found, key=lambda bad: module_order(bad.tensor))
