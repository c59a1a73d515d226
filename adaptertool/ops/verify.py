"""verify: check a checkpoint's integrity without trusting any of it.

Opening the checkpoint already checks every header (valid JSON, known dtypes, byte sizes that match
shapes, offsets that tile the file exactly) and the index (every shard present, every tensor in the
shard the index names, none missing or repeated). verify adds the index's total_size, shard files the
index forgets, the layout of quantised weights (a config.json quantization_config: every FP8 weight
has its scale on the right grid, MXFP4 blocks pair with their scales, bitsandbytes entries are
complete), and, with ``nan=True``, a scan of every float tensor for NaN and Inf, E8M0 scales
included (MXFP4 keeps them as uint8; byte 255 is NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from adaptertool.adapters.peft_keys import module_order
from adaptertool.errors import AdapterToolError
from adaptertool.io import Checkpoint, open_checkpoint, read_json
from adaptertool.ops.measure import Stopwatch

__all__ = ["VERIFY_SCHEMA", "NonFinite", "VerifyReport", "verify"]

# The --json layout's version (docs/commands/verify.md lists every field): raised when a field is removed,
# renamed, or changes type or meaning, so that scripts can tell; a new field may appear without it.
VERIFY_SCHEMA = 1

_SCANNED_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
_QUANT_MARKER = ".quant_state.bitsandbytes__"
_SCAN_CHUNK = 1 << 24  # elements read and checked at a time: bounds memory by 64 MB of float32, whatever the tensor


@dataclass(frozen=True)
class NonFinite:
    tensor: str
    nan: int
    inf: int


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    schema: int = VERIFY_SCHEMA
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
        e8m0 = _quantized_checks(ckpt, problems)
        nonfinite = _scan(ckpt, e8m0, progress=progress) if nan else []
        return VerifyReport(
            path=str(path), files=len(ckpt.files), tensors=len(ckpt), bytes=sum(s.nbytes for s in ckpt.specs()),
            scanned=nan, problems=problems, nonfinite=nonfinite, notes=notes, seconds=clock.seconds,
        )


def _index_checks(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    if ckpt.index is None:
        return [], []
    problems, notes = [], []
    metadata = read_json(ckpt.index).get("metadata")
    if not isinstance(metadata, dict | None):
        problems.append(f"{ckpt.index}: metadata is not a JSON object; loaders may refuse the index")
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    actual = sum(spec.nbytes for spec in ckpt.specs())
    if total is not None and total != actual:
        problems.append(f"{ckpt.index}: metadata.total_size is {total} but the shards hold {actual} bytes of tensors")
    listed = {f.name for f in ckpt.files}
    for other in sorted(ckpt.index.parent.glob("*.safetensors")):
        if other.name not in listed:
            notes.append(f"{other} is not named by {ckpt.index.name}; loaders will ignore it")
    return problems, notes


def _quantized_checks(ckpt: Checkpoint, problems: list[str]) -> set[str]:
    """Check the layout of a quantised checkpoint's weights (appending to ``problems``); returns the
    uint8 tensors that hold E8M0 scales (MXFP4), which the NaN scan reads as such."""
    config = read_json(ckpt.root / "config.json") if ckpt.root and (ckpt.root / "config.json").is_file() else {}
    if not config.get("quantization_config") and not any(_QUANT_MARKER in name for name in ckpt):
        return set()
    from adaptertool.ops.quantized import open_quantized_view  # imports torch: quantised checkpoints only
    from adaptertool.quant import Mxfp4Weight

    try:
        view = open_quantized_view(ckpt)
    except AdapterToolError as err:
        problems.append(str(err))
        return set()
    quantized = view.quantized.values() if view is not None else ()
    return {w.layout.scales for w in quantized if isinstance(w.layout, Mxfp4Weight)}


def _scan(ckpt: Checkpoint, e8m0: set[str], *, progress: bool) -> list[NonFinite]:
    import torch  # only the scan needs it; see adaptertool.io.format

    found = []
    total = sum(ckpt[n].nbytes for n in ckpt if ckpt[n].dtype in _SCANNED_CODES or n in e8m0)
    with tqdm(total=total, unit="B", unit_scale=True, desc="scan", disable=not progress) as bar:
        for name in ckpt:
            info = ckpt[name]
            if info.dtype not in _SCANNED_CODES and name not in e8m0:
                continue
            nans = infs = 0
            for piece in ckpt.read_pieces(name, _SCAN_CHUNK):  # a piece at a time: tensors larger than memory scan too
                chunk = (piece.view(torch.float8_e8m0fnu) if name in e8m0 else piece).float()
                nans += int(torch.isnan(chunk).sum())
                infs += int(torch.isinf(chunk).sum())
                bar.update(piece.numel() * piece.element_size())
            if nans or infs:
                found.append(NonFinite(name, nans, infs))
    return sorted(found, key=lambda bad: module_order(bad.tensor))
