"""Training on several processes with PyTorch's own engine: torchrun's environment, DDP or FSDP2
over the native decoder, and the few collectives the loop needs.

A job is what ``torchrun`` (or ``train --devices N``, which calls torchrun's launcher) starts: one
process per device, each told its rank by the environment. Every process reads the same data and
takes its own micro-batches of each step (:mod:`adaptertool.training.loop`); the adapter's gradients
are averaged across processes, by one of:

- DDP: the base replicated on every device, the LoRA gradients all-reduced once per step (frozen
  weights and buffers are left out of DDP's broadcasts: they are identical on every rank already);
- FSDP2 (``fully_shard`` per block, then the root): every parameter, 4-bit codes included, split
  across the devices of a node and gathered block by block as the forward and backward reach it;
  ``replicate_nodes`` shards within a node and replicates across nodes (HSDP).

DDP hooks only ``forward`` and FSDP2 only methods registered with it: the decoder's ``loss_sum``
is reached through a wrapper module (DDP) or registered (FSDP2); called any other way its
gradients would silently stay per process. FSDP2's mixed-precision policy is not used: the base
is loaded in its compute dtype and the adapter stays float32, as on one device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adaptertool.errors import InputError, OptionError, ProcessError
from adaptertool.training.data import IGNORE

if TYPE_CHECKING:
    from adaptertool.training.model import Decoder

__all__ = ["PARALLEL", "SINGLE", "Group", "Replicas", "choose_parallel", "environment_group", "first_line", "full_tensor",
           "parallelize", "resident_bytes", "shard_block", "shard_like", "start", "stop"]

PARALLEL = ("auto", "ddp", "fsdp")
# FSDP2 shards uint8 parameters from torch 2.13 on (pytorch#177948); older releases fail on them,
# so there the 4-bit and FP8 codes stay buffers: replicated, as under DDP.
_SHARDS_INTEGER_PARAMS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


@dataclass(frozen=True)
class Group:
    """This process's place in the job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """The process that writes outputs, logs and progress."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (a picklable object of our own making), in rank order, on every process."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Group()


def environment_group() -> Group | None:
    """The group torchrun describes in the environment (of one process, too); None when not started by it.

    Raises:
        AdapterToolError: torchrun's variables present but not numbers.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world, local_rank, local_world = (int(os.environ.get(n, "0" if "RANK" in n else "1")) for n in names)
    except ValueError as err:
        raise InputError(f"torchrun's environment is malformed ({err}); start the job with torchrun") from err
    return Group(rank, world, local_rank, local_world)


def start(group: Group, device_name: str, *, timeout_s: float) -> torch.device:
    """Join the job's process group; the device of this process (``cuda:LOCAL_RANK`` or the CPU).

    NCCL moves CUDA tensors; gloo the CPU ones (on a CPU job, all of them).

    Raises:
        AdapterToolError: more processes on this node than CUDA devices, or the rendezvous failing.
    """
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not cuda:
        raise OptionError("--device cuda, but torch sees no CUDA device; use --device cpu or auto")
    if cuda:
        if group.local_rank >= torch.cuda.device_count():
            raise ProcessError(f"rank {group.rank} is local rank {group.local_rank} but this node has "
                               f"{torch.cuda.device_count()} CUDA devices; start at most that many processes per node")
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
    try:
        torch.distributed.init_process_group(backend, rank=group.rank, world_size=group.world,
                                             timeout=datetime.timedelta(seconds=timeout_s),
                                             device_id=device if cuda else None)
    except (RuntimeError, ValueError) as err:
        raise ProcessError(f"rank {group.rank}: could not join the job's process group ({first_line(err)}); "
                           "check that every node reaches the rendezvous endpoint (--rdzv-endpoint)") from err
    return device


def stop() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def choose_parallel(parallel: str, *, base_bytes: int, device: torch.device, group: Group) -> tuple[str, str]:
    """``(ddp|fsdp, why)`` for ``--parallel``: auto replicates a base that takes at most half a
    device's memory (DDP: the fastest where it fits) and shards a larger one."""
    if parallel != "auto":
        return parallel, "as --parallel asked"
    if device.type == "cuda":
        capacity, where = torch.cuda.get_device_properties(device).total_memory, f"{device}'s memory"
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // group.local_world
        where = f"this node's memory over its {group.local_world} processes"
    size = f"the base ({base_bytes / 1e9:.1f} GB) {{}} half of {where} ({capacity / 1e9:.1f} GB)"
    if base_bytes <= capacity // 2:
        return "ddp", size.format("fits in")
    return "fsdp", size.format("exceeds")


class Replicas:
    """The decoder as the training loop drives it: on one process, the model itself."""

    def __init__(self, model: Decoder) -> None:
        self.model = model

    def loss_sum(self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                 aux_weight: float = 0.0) -> torch.Tensor:
        return self.model.loss_sum(ids, targets, attention_mask=mask, ignore_index=IGNORE, aux_weight=aux_weight)

    def local_only(self) -> contextlib.AbstractContextManager[None]:
        """A context whose backward passes keep their gradients in this process (gradient accumulation)."""
        return contextlib.nullcontext()


class _LossSum(nn.Module):
    """DDP's view of the decoder: its forward is the decoder's loss_sum."""

    def __init__(self, model: Decoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                aux_weight: float = 0.0) -> torch.Tensor:
        return self.model.loss_sum(ids, targets, attention_mask=mask, ignore_index=IGNORE, aux_weight=aux_weight)


class _DataParallel(Replicas):
    def __init__(self, model: Decoder, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().__init__(model)
        wrapper = _LossSum(model)
        # Without this DDP broadcasts the whole base from rank 0 at start and every buffer (QLoRA's
        # codes: the whole base again) before every forward; the ranks loaded identical weights.
        frozen = [n for n, p in wrapper.named_parameters() if not p.requires_grad] + [n for n, _ in wrapper.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(wrapper, frozen)
        self.ddp = DDP(wrapper, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)

    def loss_sum(self, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
                 aux_weight: float = 0.0) -> torch.Tensor:
        return self.ddp(ids, targets, mask, aux_weight)

    def local_only(self) -> contextlib.AbstractContextManager[None]:
        return self.ddp.no_sync()


class _Sharded(Replicas):
    def local_only(self) -> contextlib.AbstractContextManager[None]:
        return _gradient_sync_off(self.model)


@contextlib.contextmanager
def _gradient_sync_off(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]  # FSDPModule's
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def shard_block(group: Group, device: torch.device, *, replicate_nodes: bool) -> Any:
    """The ``shard`` callback for :func:`adaptertool.training.weights.load_decoder` under FSDP2: each
    block becomes one unit (its 4-bit or FP8 codes as parameters, so they are sharded too), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from adaptertool.training.lora import PackedWeight
    from adaptertool.training.model import Decoder

    if replicate_nodes and group.world > group.local_world:
        mesh = init_device_mesh(device.type, (group.world // group.local_world, group.local_world),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (group.world,))

    def shard(module: nn.Module) -> None:
        if _SHARDS_INTEGER_PARAMS:
            for part in module.modules():
                if isinstance(part, PackedWeight):
                    part.codes_as_parameters()
        fully_shard(module, mesh=mesh)
        if isinstance(module, Decoder):
            register_fsdp_forward_method(module, "loss_sum")

    return shard


def parallelize(model: Decoder, parallel: str | None, device: torch.device) -> Replicas:
    """The loop's view of ``model``: as it is (``parallel`` None: one process, not started by
    torchrun), under DDP, or (already sharded by :func:`shard_block` at load) under FSDP2."""
    if parallel is None:
        return Replicas(model)
    if parallel == "ddp":
        return _DataParallel(model, device)
    return _Sharded(model)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers held by this process (its shards under FSDP2)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process must call it), else ``tensor``."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, as saved) laid out as ``param`` is: this process's shard of it under FSDP2."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return tensor.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(param.device), mesh, param.placements)  # type: ignore[attr-defined]


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's distributed errors run to many)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
