"""Sinkhorn and the k-sparse OT plan against plain references and OTT's conventions."""
import itertools
import math

import torch

from damex.models.moe.optimal_transport import (project_k_sparse_simplex, sinkhorn_plan,
                                                sparsity_constrained_plan)


def test_sinkhorn_3x2_plan_after_one_and_two_iterations():
    # K = exp(scores) = [[1, 2], [3, 1], [1, 1]]; rows sum to 1, columns to T/E = 1.5.
    # Iteration 1: u = 1. v = 1.5 / (K^T u) = 1.5 / [5, 4] = [3/10, 3/8];
    #   K v = [3/10 + 3/4, 9/10 + 3/8, 3/10 + 3/8] = [21/20, 51/40, 27/40], u = 1 / K v.
    #   plan = u K v: row 0 = [3/10, 3/4] / (21/20) = [2/7, 5/7]; row 1 = [9/10, 3/8] /
    #   (51/40) = [12/17, 5/17]; row 2 = [3/10, 3/8] / (27/40) = [4/9, 5/9].
    #   Rows sum to 1 exactly; columns 1.436 / 1.564.
    # Iteration 2: K^T u = [20/21 + 3*40/51 + 40/27, 2*20/21 + 40/51 + 40/27], so
    #   v = [9639/30760, 9639/26800] and v0 : v1 = 670 : 769. Rows normalise K_i * v:
    #   row 0 = [670, 2*769] / 2208 = [335/1104, 769/1104]; row 1 = [3*670, 769] / 2779 =
    #   [2010/2779, 769/2779]; row 2 = [670, 769] / 1439. Columns 1.4923 / 1.5077.
    scores = torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 1.0]], dtype=torch.float64).log()
    one = torch.tensor([[2 / 7, 5 / 7], [12 / 17, 5 / 17], [4 / 9, 5 / 9]], dtype=torch.float64)
    two = torch.tensor([[335 / 1104, 769 / 1104], [2010 / 2779, 769 / 2779],
                        [670 / 1439, 769 / 1439]], dtype=torch.float64)
    for iters, expected in ((1, one), (2, two)):
        plan = sinkhorn_plan(scores, num_iters=iters)
        torch.testing.assert_close(plan, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(plan.sum(1), torch.ones(3, dtype=torch.float64),
                                   rtol=0, atol=1e-12)



def test_sinkhorn_rows_exact_columns_converge():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 4  # sharp logits, where the update order matters most
    plan = sinkhorn_plan(logits, num_iters=20)
    torch.testing.assert_close(plan.sum(1), torch.ones(64), rtol=0, atol=1e-5)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 16.0), rtol=0, atol=0.5)
    converged = sinkhorn_plan(logits.double(), num_iters=2000)
    torch.testing.assert_close(converged.sum(0), torch.full((4,), 16.0, dtype=torch.float64))



def test_sinkhorn_plan_meets_marginals():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 3
    plan = sinkhorn_plan(logits, num_iters=20)
    torch.testing.assert_close(plan.sum(1), torch.ones(64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 16.0), rtol=0, atol=0.2)
    assert torch.all(plan >= 0)



def test_sinkhorn_plan_matches_plain_sinkhorn():
    torch.manual_seed(1)
    logits = torch.randn(12, 3, dtype=torch.float64)
    # textbook (non-log) Sinkhorn-Knopp on K = exp(logits), columns first as OTT
    kernel = logits.exp()
    u = torch.ones(12, dtype=torch.float64)
    for _ in range(20):
        v = 4.0 / (kernel.t() @ u)
        u = 1.0 / (kernel @ v)
    expected = u[:, None] * kernel * v[None, :]
    torch.testing.assert_close(sinkhorn_plan(logits, 20).double(), expected, rtol=1e-4, atol=1e-5)



def log_domain_sinkhorn(scores, num_iters):
    """OTT's log-domain iterations (columns first), float64: the reference for sharp scores."""
    num_tokens, num_experts = scores.shape[-2:]
    kernel = scores.double()
    u = kernel.new_zeros(kernel.shape[:-1])[..., None]
    for _ in range(num_iters):
        v = math.log(num_tokens / num_experts) - torch.logsumexp(kernel + u, -2, keepdim=True)
        u = -torch.logsumexp(kernel + v, -1, keepdim=True)
    return torch.exp(kernel + u + v)


def test_sinkhorn_with_logit_gaps_beyond_float_range_equals_the_log_domain():
    # gaps of hundreds: exp() of the raw scores under- or overflows even in float64, and an
    # expert no token prefers (column 3) needs a huge scaling; the plan must still be exact
    torch.manual_seed(3)
    scores = 150 * torch.randn(2, 40, 4, dtype=torch.float64)
    scores[..., 3] -= 400
    for iters in (1, 2, 20):
        plan = sinkhorn_plan(scores, num_iters=iters)
        assert torch.isfinite(plan).all()
        torch.testing.assert_close(plan, log_domain_sinkhorn(scores, iters), rtol=1e-9, atol=1e-12)
    plan32 = sinkhorn_plan(scores.float(), num_iters=20)
    assert plan32.dtype == torch.float32
    torch.testing.assert_close(plan32.double(), log_domain_sinkhorn(scores.float(), 20),
                               rtol=1e-5, atol=1e-6)


def brute_force_k_sparse_projection(v, k):
    best, best_dist = None, float('inf')
    for support in itertools.combinations(range(len(v)), k):
        sub = v[list(support)]
        # projection of sub onto the simplex by sorting
        srt = torch.sort(sub, descending=True).values
        css = srt.cumsum(0) - 1
        rho = max(i for i in range(k) if srt[i] - css[i] / (i + 1) > 0)
        proj = (sub - css[rho] / (rho + 1)).clamp(min=0)
        full = torch.zeros_like(v)
        full[list(support)] = proj
        dist = (full - v).pow(2).sum().item()
        if dist < best_dist:
            best, best_dist = full, dist
    return best



def test_k_sparse_simplex_projection_matches_brute_force():
    torch.manual_seed(2)
    values = torch.randn(20, 6, dtype=torch.float64)
    for k in (1, 2, 3, 6):
        projected = project_k_sparse_simplex(values, k)
        for row, got in zip(values, projected):
            torch.testing.assert_close(got, brute_force_k_sparse_projection(row, k))



def test_k_sparse_projection_ties_keep_the_lower_index_and_batch():
    # rows with values tied across the k-th place: the lower index is kept, as the
    # reference's stable sort; leading dims are independent rows. Expected by hand: keep
    # the k entries, tau = (sum of the support - 1) / |support|, entries minus tau.
    values = torch.tensor([[[0.5, 0.2, 0.5, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3, 0.3]],
                           [[0.0, 0.0, 0.0, 0.9, 0.0], [0.4, 0.1, 0.4, 0.2, 0.4]]],
                          dtype=torch.float64)
    third, thirtieth = 1 / 3, 1 / 30
    expected = {
        1: [[[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]], [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0]]],
        2: [[[0.5, 0, 0.5, 0, 0], [0.5, 0.5, 0, 0, 0]],
            [[0.05, 0, 0, 0.95, 0], [0.5, 0, 0.5, 0, 0]]],
        3: [[[third, 0, third, third, 0], [third, third, third, 0, 0]],
            [[thirtieth, thirtieth, 0, 0.9 + thirtieth, 0], [third, 0, third, 0, third]]],
    }
    for k, rows in expected.items():
        torch.testing.assert_close(project_k_sparse_simplex(values, k),
                                   torch.tensor(rows, dtype=torch.float64))



def test_sparsity_constrained_plan_marginals_and_sparsity():
    torch.manual_seed(3)
    sim = torch.randn(40, 4).softmax(-1)
    # Without the sparsity constraint the problem is convex: the semi-dual solver meets
    # the row marginals too.
    dense = sparsity_constrained_plan(sim, k=40, num_iters=2000, lr=0.05)
    torch.testing.assert_close(dense.sum(1), torch.ones(40), rtol=0, atol=0.03)
    torch.testing.assert_close(dense.sum(0), torch.full((4,), 10.0), rtol=1e-5, atol=1e-5)
    # k-sparse: columns exact with at most k non-zeros each (rows only approximately,
    # the constrained problem is not convex).
    plan = sparsity_constrained_plan(sim, k=12)
    assert torch.all((plan > 0).sum(0) <= 12) and torch.all(plan >= 0)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 10.0), rtol=1e-5, atol=1e-5)



def test_ot_solvers_batched_over_groups_equal_one_solve_per_group():
    torch.manual_seed(2)
    scores = 3 * torch.randn(3, 20, 4)
    batched = sinkhorn_plan(scores, num_iters=7)
    for g in range(3):
        torch.testing.assert_close(batched[g], sinkhorn_plan(scores[g], num_iters=7))
    similarity = scores.softmax(-1)
    batched = sparsity_constrained_plan(similarity, k=5)
    for g in range(3):
        torch.testing.assert_close(batched[g], sparsity_constrained_plan(similarity[g], k=5))
