"""Small helpers shared by the spectral/adapter methods (OSF, EigenTune, CURLoRA).

Kept private: module replacement, the [out, in] view of a linear-like weight, and reading an adapter file with
the same checks as :meth:`Method.load` (method name, base fingerprint) for methods whose adapter files also hold
buffers (sampled indices, preserved subspaces), which the base loader, restricted to parameters, cannot place.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import ConfigError
from ..selection import Selection
from .base import Targets, resolve_linear_targets


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` (a transposed view for GPT-2 style ``Conv1D``, whose weight is ``[in, out]``)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def resolve_targets(model: nn.Module, targets: Targets, method: str) -> list[str]:
    """:func:`resolve_linear_targets`, plus a warning when a selection also holds fused 3-D MoE expert parameters
    (these three methods decompose 2-D linear weights only, so such tensors are left frozen)."""
    if isinstance(targets, Selection) and targets.moe_parameter_names:
        warnings.warn(
            f"{method}: {len(targets.moe_parameter_names)} fused MoE expert parameter(s) in the selection are not "
            "2-D linear layers and stay frozen (use the 'selective' or 'lora' method to train them)",
            stacklevel=3,
        )
        if not targets.module_names:
            raise ConfigError(f"method {method!r}: the selection holds only fused MoE expert tensors; nothing to adapt")
    names = resolve_linear_targets(model, targets)
    if not names:
        raise ConfigError(f"method {method!r}: empty selection, no linear module to adapt")
    return names


def check_rank(method: str, rank: int, names: list[str], model: nn.Module, *, what: str = "rank", limit_offset: int = 0) -> None:
    """ConfigError when ``rank`` is not a positive int or exceeds ``min(out, in) - limit_offset`` of any target."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"method {method!r}: {what} must be a positive integer, got {rank!r}")
    for n in names:
        shape = tuple(model.get_submodule(n).weight.shape)
        if rank > min(shape) - limit_offset:
            raise ConfigError(
                f"method {method!r}: {what}={rank} is larger than {n} allows (weight {shape}, at most "
                f"{min(shape) - limit_offset}); lower the {what} or drop that target"
            )


