"""Expert-choice routers: every expert picks its top-C tokens (Zhou et al. 2022; Liu et al. 2024).

A token may be taken by 0..E experts. Capacity C = ceil(T * capacity_factor / E) per
routing group (rounded up to ``capacity_multiple_of``); when the layer sets no capacity
factor these routers use 1.0 (the compute of top-1 routing). Among tokens with equal
scores an expert takes the lower token index first, as the reference.
``last_routing`` gets ``expert_tokens`` (E, C), the flat token index (into B*N) each
expert slot took, and ``expert_gates`` (E, C), its combine weight (groups concatenated
along C).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmdet.registry import MODELS
from ..losses import z_loss
from ..optimal_transport import sinkhorn_plan, sparsity_constrained_plan
from ..routing import ExpertChoiceRouting, merge_group_routings, sparse_from_expert_choice
from .base import GatedRouter


@MODELS.register_module()
class SoftmaxExpertChoiceRouter(GatedRouter):
    """Each expert takes the C tokens with the highest softmax gate for it (Zhou et al. 2022).

    As the reference (vmoe), gates are softmax(logits + noise) in training with noise std
    1/E (``noise_std=1.0``, divided by E) and the clean softmax in eval. The other
    expert-choice routers change only how experts rank tokens (:meth:`selection_scores`);
    combine weights are always the softmax gates.
    """
    default_capacity_factor = 1.0

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 1.0,
                 use_z_loss: bool = False, capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)

    def selection_scores(self, logits: Tensor, gates: Tensor, capacity: int) -> Tensor:
        """(G, M, E) scores by which each expert ranks the tokens of each of G groups."""
        return gates

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None,
                groups: Optional[Sequence[Tuple[int, int]]] = None) -> ExpertChoiceRouting:
        """The router contract (:class:`~.base.BaseRouter`); targets are not used.

        Groups of equal size are ranked in one batched pass (one OT solve for all images,
        not one per image); an expert only ever takes tokens of the group it ranks.
        """
        runs = self.group_runs(tokens.shape[0], groups)
        logits, noisy_logits, _ = self.gate_logits(tokens)
        gates = noisy_logits.float().softmax(dim=-1)
        routings = []
        for start, size, count in runs:
            stop = start + size * count

            def grouped(t: Tensor) -> Tensor:
                return t[start:stop].view(count, size, -1)

            capacity = self.capacity(size, capacity_factor)
            scores = self.selection_scores(grouped(noisy_logits.detach().float()),
                                           grouped(gates.detach()), capacity)
            starts = torch.arange(count, device=tokens.device) * size
            routings.append(sparse_from_expert_choice(logits[start:stop], scores, capacity,
                                                      gates[start:stop], starts))
        routing = merge_group_routings(routings, [start for start, _, _ in runs])
        if self.use_z_loss:  # averaged over groups: within a run of equal groups, over tokens
            per_run = [z_loss(logits[start:start + size * count]) * count
                       for start, size, count in runs]
            routing.aux_losses['z'] = torch.stack(per_run).sum() / sum(c for _, _, c in runs)
        return routing


@MODELS.register_module()
class SinkhornExpertChoiceRouter(SoftmaxExpertChoiceRouter):
    """Each expert takes its top-C tokens by the Sinkhorn plan of cost -logits (eps 1).

    Default ``noise_std=0.0``: the plan already balances the experts, and we know of no
    reference default for this router; set ``noise_std`` to add V-MoE-style noise.
    """

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 num_iters: int = 20, use_z_loss: bool = False, capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        self.num_iters = num_iters

    def selection_scores(self, logits, gates, capacity):
        return sinkhorn_plan(logits, self.num_iters)


@MODELS.register_module()
class SparsityConstrainedExpertChoiceRouter(SoftmaxExpertChoiceRouter):
    """Expert choice by k-sparse, squared-L2 regularised OT on softmax(logits) (Liu et al. 2023).

    The plan has at most k = C non-zeros per expert; each expert takes its top-C tokens by
    the plan (ties, e.g. a column with fewer than C non-zeros, to the lower token index).
    Solved with ``num_iters`` Adam steps (lr ``lr``) on the semi-dual, as vmoe. As the
    reference, this router adds no gate noise: ``noise_std`` other than 0 is an error.
    """

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 gamma: float = 1.0, num_iters: int = 20, lr: float = 1e-2,
                 use_z_loss: bool = False, capacity_multiple_of: int = 1):
        if noise_std != 0:
            raise ValueError(
                'SparsityConstrainedExpertChoiceRouter adds no gate noise (as the reference, '
                f'vmoe); got noise_std={noise_std}: remove it from the router config')
        super().__init__(embed_dims, num_experts, noise_std=0.0, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        self.gamma = gamma
        self.num_iters = num_iters
        self.lr = lr

    def selection_scores(self, logits, gates, capacity):
        return sparsity_constrained_plan(gates, capacity, self.gamma, self.num_iters, self.lr)
