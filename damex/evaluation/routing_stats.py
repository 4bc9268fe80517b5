"""Which expert each dataset's tokens reach: routing accuracy (counting is the MoE
layer's, :mod:`damex.models.moe.telemetry`)."""
from typing import Sequence

import torch
from torch import Tensor

from ..models.moe.telemetry import routing_telemetry, tokens_per_expert  # noqa: F401


def routing_accuracy(counts: Tensor, experts: Sequence[int]) -> Tensor:
    """Per dataset: share of its tokens that reached its mapped expert.

    counts: (num_datasets, E) tokens of each dataset per expert; experts: expert of each
    dataset. A token dispatched to several experts counts once per expert, so with top-k
    routing the denominator is the number of (token, expert) dispatches.
    """
    experts = torch.as_tensor(experts, dtype=torch.long)
    total = counts.sum(dim=1).clamp(min=1)
    return counts.gather(1, experts[:, None]).squeeze(1).double() / total
