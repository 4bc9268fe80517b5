"""Optimal-transport plans used by the Sinkhorn and sparsity-constrained routers.

Both turn a (T, E) score matrix into a transport plan whose rows sum to 1 (each token
is one unit of mass) and whose columns sum to T/E (every expert gets the same share).
Neither is differentiated: routers use the plan only to choose, and take their combine
weights from the router softmax (as the reference, google-research/vmoe).
"""
import math
from typing import Optional

import torch
from torch import Tensor


@torch.no_grad()
def sinkhorn_plan(scores: Tensor, num_iters: int = 20, epsilon: float = 1.0) -> Tensor:
    """Entropic OT plan for cost -scores (log-domain Sinkhorn, fixed iterations).

    Each iteration matches the column marginals (T/E per expert) first and the row
    marginals (1 per token) last, as the reference (OTT's Sinkhorn, which
    google-research/vmoe calls): after any number of iterations every row sums exactly
    to 1 and the columns converge to T/E. In scaling form, with K = exp(scores / eps),
    u = 1, v = 1 at the start: v = (T/E) / (K^T u), then u = 1 / (K v).
    scores: (..., T, E), leading dims are independent problems (routing groups solved in
    one batched pass). Returns the plan diag(u) K diag(v), (..., T, E).
    """
    if num_iters < 1:
        raise ValueError(f'num_iters must be >= 1, got {num_iters}')
    num_tokens, num_experts = scores.shape[-2:]
    kernel = scores.to(torch.promote_types(scores.dtype, torch.float32)) / epsilon
    log_row = 0.0
    log_col = math.log(float(num_tokens) / num_experts)
    u = kernel.new_zeros(kernel.shape[:-1])[..., None]  # (..., T, 1)
    for _ in range(num_iters):
        v = log_col - torch.logsumexp(kernel + u, dim=-2, keepdim=True)  # (..., 1, E)
        u = log_row - torch.logsumexp(kernel + v, dim=-1, keepdim=True)
    return torch.exp(kernel + u + v)


def project_k_sparse_simplex(values: Tensor, k: int, inverse_rank: Optional[Tensor] = None
                             ) -> Tensor:
    """Euclidean projection of each row of ``values`` onto the k-sparse probability simplex.

    Keep the k largest entries of a row, project them onto the simplex, zero the rest
    (Kyrillidis et al. 2013). values: (..., M). Returns (..., M) rows with <= k non-zeros.
    ``inverse_rank``: 1 / (1, ..., k) in ``values``' dtype, for callers that project in a
    loop (it is the same every time).
    """
    k = min(k, values.shape[-1])
    if inverse_rank is None or inverse_rank.numel() != k:
        inverse_rank = 1.0 / torch.arange(1, k + 1, device=values.device, dtype=values.dtype)
    # the k largest values, descending (their order among equal values does not matter here)
    top = torch.topk(values, k, dim=-1).values
    cumsum = top.cumsum(dim=-1).sub_(1.0)
    support_size = (top > cumsum * inverse_rank).sum(dim=-1, keepdim=True).clamp_(min=1)
    tau = cumsum.gather(-1, support_size - 1).div_(support_size)
    # which k entries are kept: all above the k-th value, then those equal to it, lower
    # index first (the reference's order); elementwise, cheaper than a full stable sort
    kth = top[..., -1:]
    above = values > kth
    tied = values == kth
    room = k - above.sum(dim=-1, keepdim=True)
    kept = above | (tied & (tied.cumsum(dim=-1) <= room))
    return (values - tau).clamp_(min=0).mul_(kept)


@torch.no_grad()
def sparsity_constrained_plan(similarity: Tensor, k: int, gamma: float = 1.0,
                              num_iters: int = 20, lr: float = 1e-2) -> Tensor:
    """Squared-L2 regularised OT with at most k non-zeros per expert column (Liu et al. 2023).

    Solved in the semi-dual over the token potentials alpha (T,), as the reference:
    minimise -<a, alpha> + sum_e b_e * max_e(alpha - C[:, e]) with Adam, where C = -similarity,
    a = 1 per token, b = T/E per expert, and max_e is the squared-L2 max operator over the
    k-sparse simplex scaled by gamma * b_e. The plan is P[:, e] = b_e * p_e with p_e the
    projection of (alpha - C[:, e]) / (gamma * b_e) onto the k-sparse simplex.
    similarity: (..., T, E), e.g. softmax(logits); leading dims are independent problems
    (routing groups solved in one batched pass). Returns the plan (..., T, E).

    Cost: a fixed number of ops per iteration, whatever T, E or the number of groups (the
    solve runs in place on the potentials, scaled by 1 / (gamma * b), which changes no
    step: Adam's update is invariant to the gradient's scale, and the gradient here is the
    plan's row sums, not a derivative in alpha).
    """
    num_tokens, num_experts = similarity.shape[-2:]
    col_mass = float(num_tokens) / num_experts
    scale = gamma * col_mass
    # (..., E, T): one k-sparse simplex projection per expert column, on (alpha + sim) / scale
    sim = (similarity.float() / scale).transpose(-1, -2)
    k = min(k, num_tokens)
    inverse_rank = 1.0 / torch.arange(1, k + 1, device=sim.device, dtype=sim.dtype)

    def column_projection(alpha: Tensor) -> Tensor:
        return project_k_sparse_simplex(alpha[..., None, :] + sim, k, inverse_rank)

    alpha = sim.new_zeros(sim.shape[:-2] + sim.shape[-1:])  # (..., T), in units of scale
    # Adam on the semi-dual; its gradient is (row sums of the plan) - a, by Danskin's theorem.
    m = torch.zeros_like(alpha)
    s = torch.zeros_like(alpha)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, num_iters + 1):
        grad = column_projection(alpha).sum(dim=-2).mul_(col_mass).sub_(1.0)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        s.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = s.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
        alpha.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step) / scale)
    return column_projection(alpha).transpose(-1, -2).mul_(col_mass)
