"""Token-choice routers: every token picks its experts (V-MoE, DAMEX, Sinkhorn token choice)."""
import json
from typing import Optional

import torch
from torch import Tensor

from mmdet.registry import MODELS
from ..losses import damex_loss, importance_loss, load_loss, switch_loss, z_loss
from ..optimal_transport import sinkhorn_plan
from ..planning import gate_from_plan
from ..routing import SparseRouting, sparse_from_token_choice, top_k_assignment
from .base import BaseRouter


@MODELS.register_module()
class SoftmaxTokenChoiceRouter(BaseRouter):
    """Noisy top-k softmax router (V-MoE, Riquelme et al. 2021).

    Gates are softmax(logits + noise) in training; each token keeps its top-k experts
    with combine weight = its gate (not renormalised over the k, as V-MoE).

    Args:
        top_k: experts per token (K).
        noise_std: gate noise; V-MoE uses 1.0 (std 1/E).
        batch_prioritized: under a capacity, fill buffers by descending max gate instead
            of token order (BPR, V-MoE).
        use_importance_loss / use_load_loss: V-MoE balance losses ('importance' on the
            clean softmax, before noise, as V-MoE; 'load', which needs noise).
        use_switch_loss: Switch Transformer balance loss ('switch', on the gates used
            for routing).
        use_z_loss: ST-MoE router z-loss ('z').
        use_damex_loss: cross-entropy of the pre-noise logits to each token's routing
            target ('damex'); with it the router needs targets in training.
    """

    def __init__(self, embed_dims: int, num_experts: int, top_k: int = 1,
                 noise_std: float = 1.0, batch_prioritized: bool = False,
                 use_importance_loss: bool = True, use_load_loss: bool = True,
                 use_switch_loss: bool = False, use_z_loss: bool = False,
                 use_damex_loss: bool = False, capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be in [1, num_experts={num_experts}], got {top_k}')
        self.top_k = top_k
        self.batch_prioritized = batch_prioritized
        self.use_importance_loss = use_importance_loss
        self.use_load_loss = use_load_loss
        self.use_switch_loss = use_switch_loss
        self.use_damex_loss = use_damex_loss

    @property
    def requires_targets(self) -> bool:  # type: ignore[override]
        return self.use_damex_loss

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None) -> SparseRouting:
        """tokens: (T, D) of one group; targets: (T,) expert per token or None."""
        logits, noisy_logits, std = self.gate_logits(tokens)
        gates = noisy_logits.float().softmax(dim=-1)
        capacity = self.capacity(tokens.shape[0], capacity_factor, self.top_k)
        priority = gates.max(dim=-1).values if self.batch_prioritized else None
        expert_index, kept = top_k_assignment(gates, self.top_k, capacity, priority)
        routing = sparse_from_token_choice(logits, expert_index, kept, gates)
        routing.aux_losses = self.losses(logits, noisy_logits, gates, std, targets)
        return routing

    def losses(self, logits: Tensor, noisy_logits: Tensor, gates: Tensor, std: float,
               targets: Optional[Tensor]) -> dict:
        losses = {}
        if self.use_importance_loss:
            clean_gates = gates if noisy_logits is logits else logits.float().softmax(dim=-1)
            losses['importance'] = importance_loss(clean_gates)
        if self.use_load_loss and std > 0:
            losses['load'] = load_loss(logits.float(), noisy_logits.float(), std, self.top_k)
        if self.use_switch_loss:
            losses['switch'] = switch_loss(gates)
        if self.use_z_loss:
            losses['z'] = z_loss(logits)
        if self.use_damex_loss and targets is not None:
            losses['damex'] = damex_loss(logits, targets)
        return losses


@MODELS.register_module()
class DatasetAwareRouter(SoftmaxTokenChoiceRouter):
    """DAMEX router (Jain et al. 2023): top-1 routing trained to send dataset d to expert h(d).

    In training every token's pre-noise logits get a cross-entropy to its image's routing
    target (reported as 'damex'); at inference the router picks the expert from the token
    alone, no dataset id needed. As the official code: top-1, gate noise 1.0, and the
    DAMEX loss replaces the balance losses (``use_balance_loss=True`` adds them back).

    ``init_from_plan='PLAN.json'`` (written by tools/analysis_tools/plan_experts.py): the
    detector's ``init_weights`` sets the gate from the plan's entry for this router's layer
    (:func:`~damex.models.moe.planning.gate_from_plan`), so each dataset's mean token routes
    to its planned expert from the first step.
    """

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 1.0,
                 batch_prioritized: bool = True, use_balance_loss: bool = False,
                 use_z_loss: bool = False, top_k: int = 1, capacity_multiple_of: int = 1,
                 init_from_plan: Optional[str] = None):
        super().__init__(embed_dims, num_experts, top_k=top_k, noise_std=noise_std,
                         batch_prioritized=batch_prioritized,
                         use_importance_loss=use_balance_loss, use_load_loss=use_balance_loss,
                         use_z_loss=use_z_loss, use_damex_loss=True,
                         capacity_multiple_of=capacity_multiple_of)
        self.init_from_plan = init_from_plan

    @torch.no_grad()
    def init_gate_from_plan(self, layer_name: str) -> None:
        """Set the gate from the plan's dataset means at ``layer_name``."""
        with open(self.init_from_plan) as f:
            plan = json.load(f)
        layers = plan.get('layers', {})
        if layer_name not in layers:
            raise KeyError(f'expert plan {self.init_from_plan}: no entry for layer '
                           f'{layer_name!r}; it has {sorted(layers)}')
        entry = layers[layer_name]
        weight = gate_from_plan(entry['dataset_means'], plan['experts'], self.num_experts,
                                covariance=entry.get('within_covariance'))
        if weight.shape != self.gate.weight.shape:
            raise ValueError(f'expert plan {self.init_from_plan}: layer {layer_name!r} gives a '
                             f'gate of {tuple(weight.shape)}, the router has '
                             f'{tuple(self.gate.weight.shape)}')
        self.gate.weight.copy_(weight)


@MODELS.register_module()
class SinkhornTokenChoiceRouter(BaseRouter):
    """Sinkhorn token choice (Liu et al. 2024, "Routers in Vision MoE"; vmoe KL projection).

    The top-k of each token are taken from the entropic transport plan of cost -logits
    (eps 1, ``num_iters`` Sinkhorn iterations, rows 1, columns T/E), which balances experts
    without a loss; combine weights are softmax(logits) at the chosen experts, as the
    reference (the plan itself gets no gradient).
    """

    def __init__(self, embed_dims: int, num_experts: int, top_k: int = 1,
                 noise_std: float = 0.0, num_iters: int = 20, use_z_loss: bool = False,
                 capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be in [1, num_experts={num_experts}], got {top_k}')
        self.top_k = top_k
        self.num_iters = num_iters

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None) -> SparseRouting:
        logits, noisy_logits, _ = self.gate_logits(tokens)
        plan = sinkhorn_plan(noisy_logits.detach(), self.num_iters)
        capacity = self.capacity(tokens.shape[0], capacity_factor, self.top_k)
        expert_index, kept = top_k_assignment(plan, self.top_k, capacity)
        routing = sparse_from_token_choice(logits, expert_index, kept, logits.float().softmax(-1))
        routing.info['plan'] = plan
        if self.use_z_loss:
            routing.aux_losses['z'] = z_loss(logits)
        return routing
