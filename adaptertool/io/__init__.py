"""Checkpoint I/O: the safetensors and PEFT file formats, the streaming reader and sharded writer,
scratch spools, staged outputs (built in a scratch folder, renamed into place when complete) and
Hub access.

Checkpoints and adapters are read and written only through this package, and io/hub.py alone talks
to the network. Other layers write only small side files themselves: an edited config.json, the
training log, state and loss plot, a JSON report.
"""

from adaptertool.io.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    is_adapter,
    open_adapter,
    write_adapter,
)
from adaptertool.io.format import (
    DTYPES,
    FLOAT_CODES,
    TensorSpec,
    cast_specs,
    code_of_name,
    dtype_code,
    dtype_name,
    torch_dtype,
)
from adaptertool.io.reader import Checkpoint, TensorInfo, open_checkpoint
from adaptertool.io.sidefiles import SIDE_FILES, copy_side_files, read_json
from adaptertool.io.source import TensorSource, TensorTable
from adaptertool.io.spool import TensorSpool
from adaptertool.io.staging import (
    check_output,
    is_unfinished,
    scratch_prefix,
    staged_file,
    staged_output,
)
from adaptertool.io.writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter, parse_size

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_MAX_SHARD_BYTES",
    "DTYPES",
    "FLOAT_CODES",
    "SIDE_FILES",
    "Checkpoint",
    "CheckpointWriter",
    "TensorInfo",
    "TensorSource",
    "TensorSpec",
    "TensorSpool",
    "TensorTable",
    "cast_specs",
    "check_output",
    "code_of_name",
    "copy_side_files",
    "dtype_code",
    "dtype_name",
    "is_adapter",
    "is_unfinished",
    "open_adapter",
    "open_checkpoint",
    "parse_size",
    "read_json",
    "scratch_prefix",
    "staged_file",
    "staged_output",
    "torch_dtype",
    "write_adapter",
]
