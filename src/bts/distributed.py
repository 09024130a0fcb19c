"""FSDP (torch's FSDP2, `fully_shard`) for the training loop: which modules are units, sharding
them, gathering full tensors for checkpoints, and giving the model back as plain tensors.

Launch with `accelerate launch --config_file configs/accelerate/fsdp.yaml ...` (docs/scaling.md).
Accelerate owns the launch, the process group, the reductions and the gradient clipping; bts
calls `fully_shard` itself, with the plugin's settings, for two reasons:

- accelerate 1.15 drops its FSDP plugin on CPU: `AcceleratorState.__init__` (state.py, the
  `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch) turns the type into
  FSDP only for accelerator devices; MULTI_CPU is not in that list, so a CPU run launched with
  `distributed_type: FSDP` gets MULTI_CPU, no `fsdp_plugin`, and `prepare` would wrap it in DDP.
  The launcher's FSDP_* variables are still set, so bts reads them.
- accelerate picks units by class name (`fsdp_transformer_layer_cls_to_wrap`); a stitched model's
  units span several families, so bts names them from the model (`fsdp_units`) and the same
  units are used on CPU and GPU. On GPU `Accelerator.prepare` then sees an FSDP module and keeps
  it as it is (fsdp2_prepare_model's early return for manual wrapping).

FSDP2 has no public inverse of `fully_shard`; `unshard` is ours, so that `train` keeps its
contract: the model passed in comes back as the plain `nn.Module` it was, with full weights.
"""

from __future__ import annotations

import os
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
from torch.distributed._composable_state import _module_state_mapping
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from bts.arch.base import REGISTRY
from bts.errors import BtsError
from bts.stitch import StitchLayer

# set by fully_shard on every module a unit manages (for torch.compile); removed by `unshard`
_MANAGED_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def fsdp_plugin(acc: Accelerator) -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings this process was launched with; None under DDP or in one process."""
    if acc.distributed_type == DistributedType.FSDP:
        plugin = acc.state.fsdp_plugin
    elif acc.distributed_type == DistributedType.MULTI_CPU and _launched_with_fsdp():
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
    else:
        return None
    if plugin.fsdp_version != 2:
        raise BtsError(
            f"bts trains with FSDP2 only, the launch config asks for fsdp_version "
            f"{plugin.fsdp_version}: set fsdp_config.fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
        )
    if plugin.activation_checkpointing:
        raise BtsError(
            "fsdp_activation_checkpointing is not supported by bts: set it to false and use "
            "stitch.checkpoint_frozen, which recomputes the frozen blocks"
        )
    return plugin


def _launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units of their own: every decoder block of a family bts has
    an adapter for (hub, experts, a plain causal LM) and every stitch layer. The rest (embeddings,
    final norms, heads, the output stitch) is the root unit: the output stitch's `weights` runs
    outside its forward (bts.heads.mixed_output), and a unit's weights are gathered only around
    its own forward."""
    return [m for m in model.modules() if type(m).__name__ in REGISTRY or isinstance(m, StitchLayer)]


def shard(model: nn.Module, plugin: FullyShardedDataParallelPlugin) -> torch.device:
    """Shard `model` in place: each unit, then the root. Returns the device its weights were
    on, for `unshard`."""
    inference = getattr(model, "inference", None)
    if getattr(inference, "batched_training", False):
        raise BtsError(
            "inference.batched_training stacks the constituents' weights outside their blocks, "
            "which FSDP shards: set batched_training false to train under FSDP"
        )
    _drop_stacks(model)  # the stacks would keep every full weight alive next to the shards
    # A stitch layer hands back views (its gates, split per expert); FSDP warns that an in-place
    # op on one would skip its backward hook. bts only reads them or casts them out of place
    # (StitchedModel.apply_stitch), and tests/test_fsdp.py checks the gradients end to end.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPStitchLayer\) returned a view")
    home = next(model.parameters()).device
    kwargs = {
        "offload_policy": plugin.cpu_offload or OffloadPolicy(),
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    for unit in fsdp_units(model):
        fully_shard(unit, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    # the root keeps torch's default (not resharded after forward: backward needs it first)
    fully_shard(model, **kwargs)
    return home


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor: call it on all ranks)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`tensor` (full, the same on every rank) laid out as `param`'s shards."""
    if not isinstance(param, DTensor) or tensor.shape != param.shape:
        return tensor  # a plain parameter, or a per-parameter scalar such as Adam's step
    device = param.to_local().device
    # every rank holds the same full tensor (read from the checkpoint): each keeps its shard
    return distribute_tensor(tensor.to(device), param.device_mesh, param.placements,
                             src_data_rank=None)


def unshard(model: nn.Module, device: torch.device) -> None:
    """Undo `shard` on every rank: full plain parameters on `device`, the original classes, no
    FSDP hooks or state. Gathers in module order, the same on every rank."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.reshard()  # the registered parameters are the sharded DTensors again
    gathered: dict[int, nn.Parameter] = {}  # by id: a tied weight stays one parameter
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in gathered:
                    whole = param.full_tensor().detach().to(device)
                    gathered[id(param)] = nn.Parameter(whole, requires_grad=param.requires_grad)
                module._parameters[name] = gathered[id(param)]
    for unit in units:
        _strip(unit)
    for module in model.modules():
        for flag in _MANAGED_FLAGS:
            module.__dict__.pop(flag, None)
    _drop_stacks(model)


def _strip(unit: nn.Module) -> None:
    """Remove what fully_shard added to one unit: its hooks, state and FSDP class."""
    state = unit._get_fsdp_state()
    state._pre_forward_hook_handle.remove()
    state._post_forward_hook_handle.remove()
    for key in (STATE_KEY, REGISTRY_KEY):
        unit.__dict__.pop(key, None)
    _module_state_mapping.pop(unit, None)
    unit.__class__ = next(c for c in type(unit).__bases__ if c is not FSDPModule)


def _drop_stacks(model: nn.Module) -> None:
    """Forget a stitched model's batched stacks (built from, and viewing, the old tensors)."""
    executor = getattr(model, "executor", None)
    if executor is not None:
        executor.drop()
