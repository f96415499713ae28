"""Data-parallel training under ``torchrun``: DistributedDataParallel, or FSDP (ZeRO-3
sharding, ``torch.distributed.fsdp.fully_shard``) for recipes too large to replicate.

``torchrun --nproc_per_node N -m seqzoo.cli train RECIPE`` sets RANK / WORLD_SIZE /
LOCAL_RANK; ``init()`` reads them and joins the process group (NCCL on CUDA, gloo on
CPU). Without them everything here is a no-op, so one code path serves both cases.
Every rank draws its contiguous shard of the same global batch (``Task.train_batch``);
only rank 0 writes logs, plots and checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from seqzoo.errors import SeqzooError

Strategy = Literal["auto", "ddp", "fsdp"]
# Above this many parameters "auto" shards with FSDP instead of replicating with DDP.
FSDP_MIN_PARAMS = 250_000_000


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was created here (and is destroyed here)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any); returns the rank info and this
    rank's device (``cuda:LOCAL_RANK`` on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        owns = True
    if dist.get_world_size() != world:
        raise SeqzooError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DistInfo(rank=rank, world_size=world, local_rank=local, owns_group=owns), device


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: Strategy, model: nn.Module) -> Literal["ddp", "fsdp"]:
    if strategy != "auto":
        return strategy
    return "fsdp" if sum(p.numel() for p in model.parameters()) >= FSDP_MIN_PARAMS else "ddp"


def wrap(model: nn.Module, info: DistInfo, device: torch.device, strategy: Literal["ddp", "fsdp"]) -> nn.Module:
    """The module the training step calls: ``model`` itself, a DDP replica, or ``model``
    sharded in place by FSDP (each block its own unit, then the root)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # Ablations (e.g. no persistent memory) can leave parameters out of the graph.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (a copy; the input is left as it is)."""
    if not info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
                     strategy: Literal["ddp", "fsdp"]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimiser state dicts on CPU (collective under FSDP: every rank
    must call it; only rank 0's copy is written). The optimiser dict keeps torch's own
    layout (integer parameter ids), the one checkpoints store."""
    if info.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if not info.is_main:  # with cpu_offload only rank 0 receives the gathered state
            return {}, {}
        return weights, _fqn_to_ids(osd)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return module.state_dict(), optimizer.state_dict()


def _fqn_to_ids(osd: dict[str, Any]) -> dict[str, Any]:
    # get_optimizer_state_dict keys by parameter name; torch's own layout numbers the
    # parameters in param-group order.
    ids: dict[str, int] = {}
    groups = []
    for group in osd["param_groups"]:
        names = group["params"]
        groups.append({**group, "params": [ids.setdefault(n, len(ids)) for n in names]})
    state = {ids[name]: value for name, value in osd.get("state", {}).items()}
    return {"state": state, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any],
                    info: DistInfo) -> None:
    """Load an unsharded optimiser state (torch's layout, as checkpoints store it) into the
    optimiser of an FSDP-sharded model; every rank calls it. The weights were loaded into
    the model before it was sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    by_id = dict(enumerate(name_of[id(p)] for g in optimizer.param_groups for p in g["params"]))
    osd = {"state": {by_id[i]: v for i, v in optimizer_state["state"].items()},
           "param_groups": [{**g, "params": [by_id[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]}
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)
