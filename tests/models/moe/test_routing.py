"""Top-k assignment, capacities, ties and routing groups against the reference (vmoe)."""
import math

import pytest
import torch

from damex.models.moe import MoEFFN, compute_capacity
from damex.models.moe.routing import RoutingSummary, group_slices, stable_topk, top_k_assignment
from damex.testing import MOE_D as D, MOE_H as H, make_eval_layer


def test_top_k_assignment_fills_first_choices_first_and_respects_priority():
    scores = torch.tensor([[0.5, 0.4, 0.1],
                           [0.6, 0.3, 0.1],
                           [0.9, 0.05, 0.05]])
    index, kept = top_k_assignment(scores, top_k=2, capacity=2)
    # expert 0: first choices of tokens 0, 1 fit, token 2's is dropped; second choices
    # (expert 1 for all) fill expert 1 with tokens 0, 1, then token 2 finds it full.
    assert index[:, 0].tolist() == [0, 0, 0]
    assert kept.tolist() == [[True, True], [True, True], [False, False]]
    _, kept = top_k_assignment(scores, top_k=1, capacity=2, priority=scores.max(-1).values)
    assert kept[:, 0].tolist() == [False, True, True]  # token 0 has the lowest priority



def test_top_k_capacity():
    assert compute_capacity(16, 4, 1.0, top_k=2) == 8
    assert compute_capacity(16, 4, 1.0, top_k=2, multiple_of=4) == 8
    assert compute_capacity(16, 4, 1.25, top_k=2) == 10
    assert compute_capacity(16, 4, 1.25, top_k=2, multiple_of=4) == 12
    assert compute_capacity(10, 4, 1.0) == 3  # expert choice: ceil(T * cf / E)
    assert compute_capacity(10, 4, 1.0, multiple_of=4) == 4
    with pytest.raises(ValueError, match='capacity_multiple_of'):
        compute_capacity(10, 4, 1.0, multiple_of=0)



def test_top2_balanced_tokens_keep_their_second_choices():
    """With T*K*cf/E slots, perfectly balanced top-2 choices are all kept at cf 1.0."""
    scores = torch.tensor([[0.5, 0.4, 0.1, 0.0], [0.1, 0.5, 0.4, 0.0],
                           [0.0, 0.1, 0.5, 0.4], [0.4, 0.0, 0.1, 0.5]] * 4)
    capacity = compute_capacity(16, 4, 1.0, top_k=2)
    _, kept = top_k_assignment(scores, 2, capacity)
    assert kept.all()
    _, kept_old = top_k_assignment(scores, 2, math.ceil(16 * 1.0 / 4))  # the old capacity
    assert kept_old[:, 1].sum() == 0  # every second choice used to be dropped



def test_stable_topk_breaks_ties_by_lower_index():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3]])
    assert stable_topk(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert stable_topk(scores, 1).tolist() == [[1], [0]]
    # the same on a long row, where torch.topk's order is not specified
    long_row = torch.zeros(1, 5000)
    assert stable_topk(long_row, 7).tolist() == [list(range(7))]



def test_capacity_is_per_group():
    layer = make_eval_layer('DatasetAwareRouter', capacity_factor=0.5)
    x = torch.randn(2, 16, D) + 3 * torch.randn(D)  # every token wants the same expert
    layer(x)
    mask = layer.last_routing.dispatch_mask  # (B, N, E)
    assert mask.sum(1).max() <= compute_capacity(16, 4, 0.5)  # per image
    layer.group_size = 'batch'
    layer(x)
    assert layer.last_routing.dispatch_mask.sum((0, 1)).max() <= compute_capacity(32, 4, 0.5)



def test_group_slices():
    assert group_slices(2, 3, 'image') == [(0, 3), (3, 6)]
    assert group_slices(2, 3, 'batch') == [(0, 6)]
    assert group_slices(2, 3, 4) == [(0, 4), (4, 6)]
    for bad in ('images', 0, -2, 1.5, True):
        with pytest.raises(ValueError, match='group_size'):
            group_slices(2, 3, bad)
    with pytest.raises(ValueError, match='group_size'):
        MoEFFN(embed_dims=D, feedforward_channels=H, group_size='tokens')


def test_tokens_per_expert_counts_dispatches_and_soft_argmax():
    mask = torch.zeros(2, 3, 2, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 0] = mask[0, 2, 1] = True  # image 0: 2 tokens -> e0, 1 -> e1
    mask[1, 0, 1] = mask[1, 0, 0] = True  # image 1: one token to both (top-2), two dropped
    sparse = RoutingSummary(family='token_choice', logits=torch.zeros(2, 3, 2),
                            dispatch_mask=mask)
    assert sparse.tokens_per_expert().tolist() == [[2, 1], [1, 1]]
    logits = torch.tensor([[[0.0, 1.0], [2.0, 1.0]]])
    assert RoutingSummary(family='soft', logits=logits).tokens_per_expert().tolist() == [[1, 1]]
