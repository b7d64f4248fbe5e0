"""Small facts about a QuantizedWeight's layout that several formats need."""

from __future__ import annotations

import torch

from ..scheme import QuantizedWeight


def group_size_of(qw: QuantizedWeight) -> int:
    """Input columns per scale: the group size, or all of them for channel/tensor."""
    ws = qw.scheme.weights
    in_features = qw.shape[1]
    return ws.group_size if ws.strategy == "group" and ws.group_size else in_features


def natural_g_idx(qw: QuantizedWeight) -> torch.Tensor:
    """The g_idx of columns in their natural order, ``i // group_size``, int32 ``[in]``."""
    return (torch.arange(qw.shape[1], device=qw.codes.device) // group_size_of(qw)).to(torch.int32)


def has_permuted_groups(qw: QuantizedWeight) -> bool:
    """True when ``qw.g_idx`` differs from the natural order (act-order with dynamic groups)."""
    return qw.g_idx is not None and not torch.equal(qw.g_idx.to(torch.int32).cpu(), natural_g_idx(qw))
