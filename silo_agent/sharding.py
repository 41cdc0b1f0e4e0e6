"""FSDP (`silo.yaml` `sharding: fsdp`): a pretrained base's parameters sharded across the ranks of a several-device
round, for a base whose weights, with the adapters' training state, do not fit one device.

torch's FSDP2 (`fully_shard`, on gloo as on NCCL) makes each block of the base's layer lists a unit and the adapted
model the root: each rank keeps 1/world of every parameter (frozen ones included) and gathers a unit's whole
parameters only while that unit computes. FSDP reduce-scatters the gradients itself, averaged over the ranks (gloo
has no pre-multiplied sum for another divide factor): the shared loop scales each rank's share of a batch by the
world size and skips its own all-reduce (fedmeki_core/training/local_training.py). After training every rank
gathers the exchanged tensors (adapters and heads, small), so rank 0 writes the delta as without sharding; the
base is never gathered whole.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.training.fedavg import FedAvgClient
from fedmeki_core.training.local_training import data_parallel_rank

# The methods of the models that run the base outside `forward`: a causal LM's loss and greedy answers, the
# injection model's (silo_agent/injector.py).
_FORWARD_METHODS = ("batch_loss", "answer", "loss", "generate")


def shards(sharding: str, spec: JobSpec, client: object) -> bool:
    """Whether this rank trains the job's base sharded; a job that cannot is declined (before anything loads)."""
    if sharding != "fsdp" or data_parallel_rank()[1] == 1 or spec.model.pretrained is None:
        return False  # a model built from a config is bounded by max_parameters: it trains data-parallel
    if (reason := _refusal(spec, client)) is not None:
        raise InvalidInputError(reason)
    return True


def _refusal(spec: JobSpec, client: object) -> str | None:
    """Why a job's base cannot train sharded (one line), or None.

    Only FedAvg's plain loop (FedAvg and the server optimisers) trains sharded: the other client halves read or
    change whole parameters outside the loop (proximal terms, control variates, personal copies), which on a shard
    would need a gather of each; a 4-bit base is quantised in place by bitsandbytes, which FSDP does not shard.
    """
    if type(client) is not FedAvgClient:
        name = spec.algorithm.name
        return f"sharding fsdp trains FedAvg's local loop only (fedavg and the server optimisers), not {name}"
    if spec.model.quantization != "none":
        return "sharding fsdp does not shard a 4-bit (QLoRA) base: train it on one device per rank without sharding"
    if spec.algorithm.personal:
        return "sharding fsdp keeps no personal tensors: the job's algorithm.personal needs data-parallel training"
    return None


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with its parameters sharded over the ranks of the torch.distributed job, each rank's shard on
    `device` (the trainer loads a model to shard in host memory): every block of each layer list is a unit, the
    rest of the model the root's."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in _FORWARD_METHODS:
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


def local_parameter_bytes(model: nn.Module) -> int:
    """The bytes of the parameters this rank holds: its shards of sharded ones, all of the others."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        total += local.numel() * local.element_size()
    return total


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each sharded tensor gathered whole (a collective: every rank calls it with the same names, in order)."""
    return {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor for name, tensor in tensors.items()}
