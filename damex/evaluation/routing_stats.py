"""Which expert each dataset's tokens reach: counting and routing accuracy."""
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor


def tokens_per_expert(last_routing: Dict[str, Optional[Tensor]]) -> Tensor:
    """(B, E) tokens of each image that reached each expert in an MoE layer's last forward.

    Sparse routers: a token reaches every expert it was dispatched to (its
    ``dispatch_mask``; a dropped token reaches none). Soft MoE: the expert with the
    largest combine mass (argmax of the per-expert logits).
    """
    mask = last_routing.get('dispatch_mask')
    if mask is None:
        logits = last_routing['logits']
        mask = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).bool()
    return mask.sum(dim=1).long()


def routing_accuracy(counts: Tensor, experts: Sequence[int]) -> Tensor:
    """Per dataset: share of its tokens that reached its mapped expert.

    counts: (num_datasets, E) tokens of each dataset per expert; experts: expert of each
    dataset. A token dispatched to several experts counts once per expert, so with top-k
    routing the denominator is the number of (token, expert) dispatches.
    """
    experts = torch.as_tensor(experts, dtype=torch.long)
    total = counts.sum(dim=1).clamp(min=1)
    return counts.gather(1, experts[:, None]).squeeze(1).double() / total
