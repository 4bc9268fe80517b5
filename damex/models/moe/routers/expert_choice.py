"""Expert-choice routers: every expert picks its top-C tokens (Zhou et al. 2022; Liu et al. 2024).

A token may be taken by 0..E experts. Capacity C = ceil(T * capacity_factor / E); when
the layer sets no capacity factor these routers use 1.0 (the compute of top-1 routing).
``last_routing`` gets ``expert_tokens`` (E, C), the flat token index (into B*N) each
expert slot took, and ``expert_gates`` (E, C), its combine weight.
"""
from typing import Optional

from torch import Tensor

from mmdet.registry import MODELS
from ..losses import z_loss
from ..optimal_transport import sinkhorn_plan, sparsity_constrained_plan
from ..routing import SparseRouting, compute_capacity, sparse_from_expert_choice
from .base import BaseRouter


@MODELS.register_module()
class SoftmaxExpertChoiceRouter(BaseRouter):
    """Each expert takes the C tokens with the highest softmax gate for it (Zhou et al. 2022).

    The other expert-choice routers change only how experts rank tokens
    (:meth:`selection_scores`); combine weights are always the softmax gates.
    """
    default_capacity_factor = 1.0

    def selection_scores(self, logits: Tensor, gates: Tensor, capacity: int) -> Tensor:
        """(T, E) scores by which each expert ranks tokens."""
        return gates

    def forward(self, x: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None) -> SparseRouting:
        tokens = x.reshape(-1, x.shape[-1])
        logits, noisy_logits, _ = self.gate_logits(tokens)
        gates = noisy_logits.float().softmax(dim=-1)
        factor = self.default_capacity_factor if capacity_factor is None else capacity_factor
        capacity = compute_capacity(tokens.shape[0], self.num_experts, factor)
        scores = self.selection_scores(noisy_logits.detach().float(), gates.detach(), capacity)
        routing = sparse_from_expert_choice(logits, scores, capacity, gates)
        if self.use_z_loss:
            routing.aux_losses['z'] = z_loss(logits)
        return routing


@MODELS.register_module()
class SinkhornExpertChoiceRouter(SoftmaxExpertChoiceRouter):
    """Each expert takes its top-C tokens by the Sinkhorn plan of cost -logits (eps 1)."""

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 num_iters: int = 20, use_z_loss: bool = False):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss)
        self.num_iters = num_iters

    def selection_scores(self, logits, gates, capacity):
        return sinkhorn_plan(logits, self.num_iters)


@MODELS.register_module()
class SparsityConstrainedExpertChoiceRouter(SoftmaxExpertChoiceRouter):
    """Expert choice by k-sparse, squared-L2 regularised OT on softmax(logits) (Liu et al. 2023).

    The plan has at most k = C non-zeros per expert; each expert takes its top-C tokens by
    the plan. Solved with ``num_iters`` Adam steps (lr ``lr``) on the semi-dual, as vmoe.
    """

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 gamma: float = 1.0, num_iters: int = 20, lr: float = 1e-2,
                 use_z_loss: bool = False):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss)
        self.gamma = gamma
        self.num_iters = num_iters
        self.lr = lr

    def selection_scores(self, logits, gates, capacity):
        return sparsity_constrained_plan(gates, capacity, self.gamma, self.num_iters, self.lr)
