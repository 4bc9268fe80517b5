"""Training telemetry from an MoE layer's last routing (no extra forward)."""
from typing import Dict, Optional

import torch
from torch import Tensor

from .routing import RoutingSummary


def tokens_per_expert(summary: RoutingSummary) -> Tensor:
    """(B, E) tokens of each image that reached each expert (see
    :meth:`RoutingSummary.tokens_per_expert`)."""
    return summary.tokens_per_expert()


@torch.no_grad()
def routing_telemetry(summary: RoutingSummary,
                      dataset_ids: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Training-time routing statistics of one MoE layer's last forward.

    - ``train_accuracy``: share of each dataset's tokens that reached the routing target
      of their image (its dataset's expert), averaged over the datasets of the batch
      (present only when the forward had targets);
    - ``load_max_over_mean``: the busiest expert's assignments over the mean per expert
      (1.0 = balanced);
    - ``drop_rate``: share of token choices dropped by a capacity (token choice), or of
      tokens no expert took (expert choice); 0 for Soft MoE;
    - ``entropy``: mean entropy (nats) of the router's softmax over experts;
    - ``bias_spread``: max - min of the aux-free balancing bias (``balance='aux_free'``).
    dataset_ids: (B,) dataset of each image (default: the targets stand in for them).
    """
    logits = summary.logits.float()  # (B, N, E)
    batch, num_tokens, _ = logits.shape
    probs = logits.softmax(-1)
    stats = dict(entropy=-(probs * probs.clamp(min=1e-12).log()).sum(-1).mean())
    mask = summary.reached()
    if summary.family == 'soft':  # nothing is dropped
        stats['drop_rate'] = logits.new_zeros(())
    elif summary.family == 'token_choice':  # (B, N, K), -1 where dropped
        stats['drop_rate'] = (summary.expert_index < 0).float().mean()
    else:  # expert choice: tokens that no expert took
        stats['drop_rate'] = (~mask.any(-1)).float().mean()
    if summary.expert_bias is not None:
        stats['bias_spread'] = summary.expert_bias.max() - summary.expert_bias.min()
    load = mask.sum((0, 1)).float()
    stats['load_max_over_mean'] = load.max() / load.mean().clamp(min=1e-12)
    targets = summary.targets
    if targets is not None:
        groups = targets if dataset_ids is None else torch.as_tensor(dataset_ids,
                                                                     device=targets.device)
        hit = mask.gather(-1, targets[:, None, None].expand(batch, num_tokens, 1))[..., 0]
        per_image = hit.float().mean(-1)  # (B,) share of the image's tokens at its target
        shares = [per_image[groups == g].mean() for g in groups.unique()]
        stats['train_accuracy'] = torch.stack(shares).mean()
    return stats
