"""Data-parallel training across processes with ``torch.distributed``.

Trainers run unchanged in one process, or in several started by ``torchrun``::

    torchrun --nproc_per_node 4 -m cps4_engine train DATA --labeled 2 --method cps4 \\
        --vlm RUN1 --out RUN2

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them and joins the process group: NCCL when the
processes train on CUDA (one GPU each, by ``LOCAL_RANK``), gloo on CPU. The model is
wrapped in ``DistributedDataParallel`` (:func:`wrap_model`), each rank draws its batches
from its own rank-strided shard of the slices (:func:`rank_shard`), and only rank 0
writes checkpoints and logs (:attr:`DistContext.is_main`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from cps4_engine.device import resolve_device


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: this process's global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this machine; picks the CUDA device.
        device: the device this process trains on.
        owns_group: True when :func:`setup` created the process group, so
            :func:`teardown` should destroy it.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and reports progress."""
        return self.rank == 0


def _environment_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str = "auto") -> DistContext:
    """Join the process group ``torchrun`` describes, or run as a single process.

    Args:
        device_name: ``auto|cpu|cuda|mps``; under several processes on CUDA each rank
            takes ``cuda:LOCAL_RANK``.

    Returns:
        The context; ``world_size == 1`` when no launcher set ``WORLD_SIZE`` > 1 and no
        group was initialised beforehand.
    """
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
        return DistContext(rank, world_size, local_rank, device, owns_group=False)
    if _environment_world_size() <= 1:
        return DistContext(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=True)


def teardown(context: DistContext, wait_for_others: bool = True) -> None:
    """Wait for the other ranks, then leave the process group if :func:`setup` created it.

    Ranks finish at different times: rank 0 still validates and writes after the last step
    (or checkpoints a cancelled run) while the others are done. A rank that destroyed its
    group and exited while rank 0 still held connections to it was seen to abort in gloo's
    threads ("terminate called without an active exception", SIGABRT). So a rank that
    leaves normally first waits at a barrier until every rank has reached it, and all leave
    together. A process that runs several trainings in a row should still give each its
    own ``MASTER_PORT`` (or create the group once itself, which :func:`setup` then joins):
    a rank that rejoins at the same address can meet rank 0's previous store, still
    listening, and the new group never forms.

    Args:
        context: what :func:`setup` returned.
        wait_for_others: False when an exception (or the consumer closing the generator)
            is leaving the training: the other ranks may never reach the barrier, and the
            failure must surface rather than wait.
    """
    if not (context.distributed and dist.is_initialized()):
        return
    if wait_for_others:
        dist.barrier()
    if context.owns_group:
        dist.destroy_process_group()


@contextmanager
def joined(device_name: str = "auto") -> Iterator[DistContext]:
    """:func:`setup` on entry, :func:`teardown` on exit (without waiting on a failure).

    Example::

        with distributed.joined("cpu") as context:
            yield from loop.run(context, cancel)
    """
    context = setup(device_name)
    try:
        yield context
    except BaseException:
        teardown(context, wait_for_others=False)
        raise
    teardown(context)


def wrap_model(model: nn.Module, context: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    The model must already be on ``context.device``. Gradients are averaged across ranks
    in ``backward``; DDP broadcasts rank 0's parameters and buffers at wrap time, so all
    replicas start identical.

    Args:
        model: the module to train.
        context: where this process stands.
        find_unused_parameters: some trainable parameters may receive no gradient (e.g. a
            head whose loss term is off, or whose output the loss does not read); DDP
            then finds them at every step instead of waiting for their gradients.
    """
    if not context.distributed:
        return model
    if context.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[context.device.index], output_device=context.device.index, find_unused_parameters=find_unused_parameters
        )
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


class _FieldsAsTuple(nn.Module):
    """Runs a module whose ``forward`` returns a dataclass and returns its fields as a tuple."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.output_type: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        output = self.module(*args, **kwargs)
        self.output_type = type(output)
        return tuple(getattr(output, field.name) for field in fields(output))


def wrap_dataclass_model(model: nn.Module, context: DistContext, find_unused_parameters: bool = False) -> Callable[..., Any]:
    """:func:`wrap_model` for a model whose ``forward`` returns a dataclass of tensors.

    DDP finds the output tensors of a tuple, list or dict but not of a dataclass (torch's
    pytree does not know it). With ``find_unused_parameters`` (or ``static_graph``) DDP
    schedules the gradient all-reduce from those tensors, so behind a dataclass it never
    runs and every rank steps with its own gradients: the replicas drift apart. The model
    therefore runs behind DDP with its fields as a tuple, repacked into the dataclass.

    Returns:
        A callable taking the model's arguments and returning its dataclass; gradients are
        averaged across ranks in ``backward`` when distributed. Save and validate ``model``
        itself.
    """
    flat = _FieldsAsTuple(model)
    trained = wrap_model(flat, context, find_unused_parameters=find_unused_parameters)

    def run(*args: Any, **kwargs: Any) -> Any:
        values = trained(*args, **kwargs)
        return flat.output_type(*values)

    return run


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rank_shard(count: int, context: DistContext) -> torch.Tensor:
    """This rank's items of ``range(count)``: every ``world_size``-th, from ``rank``.

    Ranks never share an item; when ``count < world_size`` a rank with no item of its own
    gets all of them so it still has data to draw from.

    Returns:
        int64 ``(n,)`` indices.
    """
    indices = torch.arange(context.rank, count, context.world_size, dtype=torch.int64)
    if indices.numel() == 0:
        return torch.arange(count, dtype=torch.int64)
    return indices


def any_rank(flag: bool, context: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a cancel request)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every rank's picklable ``value`` in rank order, on every rank (``[value]`` alone)."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(context: DistContext) -> None:
    """Wait until every rank reaches this point (no-op in a single process)."""
    if context.distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()
