"""One router contract (issue #20): every router, Soft MoE included, is a BaseRouter called
as router(tokens, targets, capacity_factor, groups=None) and returns its family's routing."""
import pytest
import torch

from mmdet.registry import MODELS
from damex.models.moe import (BaseRouter, ExpertChoiceRouting, MoEFFN, SoftRouting,
                              TokenChoiceRouting, build_router)
from damex.models.moe import routers as router_package

D, E, N = 16, 4, 12
FAMILIES = {
    'SoftmaxTokenChoiceRouter': TokenChoiceRouting, 'DatasetAwareRouter': TokenChoiceRouting,
    'SinkhornTokenChoiceRouter': TokenChoiceRouting,
    'SoftmaxExpertChoiceRouter': ExpertChoiceRouting,
    'SinkhornExpertChoiceRouter': ExpertChoiceRouting,
    'SparsityConstrainedExpertChoiceRouter': ExpertChoiceRouting, 'SoftMoERouter': SoftRouting,
}


def test_every_registered_router_is_a_base_router_of_a_known_family():
    registered = [name for name in router_package.__all__ if name in MODELS.module_dict]
    assert sorted(registered) == sorted(FAMILIES)
    for name in registered:
        assert issubclass(MODELS.module_dict[name], BaseRouter), name


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_one_call_returns_the_family_routing_and_one_group_calls_still_work(name):
    torch.manual_seed(0)
    router = build_router(dict(type=name), D, E).eval()
    tokens = torch.randn(2 * N, D)
    targets = torch.arange(2 * N) % E
    factor = 1.0 if FAMILIES[name] is not SoftRouting else None
    grouped = router(tokens, targets, factor, groups=[(0, N), (N, 2 * N)])
    assert type(grouped) is FAMILIES[name]
    # today's call on one group's tokens: the same as that group inside the grouped call
    for g, (start, stop) in enumerate([(0, N), (N, 2 * N)]):
        alone = router(tokens[start:stop], targets[start:stop], factor)
        assert type(alone) is FAMILIES[name]
        torch.testing.assert_close(alone.logits, grouped.logits[start:stop])
        if isinstance(alone, SoftRouting):
            torch.testing.assert_close(alone.dispatch_weights, grouped.dispatch_weights[g:g + 1])
            continue
        inside = (grouped.token_index >= start) & (grouped.token_index < stop)
        pairs = sorted(zip((grouped.token_index[inside] - start).tolist(),
                           grouped.expert_index[inside].tolist()))
        assert pairs == sorted(zip(alone.token_index.tolist(), alone.expert_index.tolist()))


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_the_layer_summary_is_typed_by_family(name):
    layer = MoEFFN(embed_dims=D, feedforward_channels=8, num_experts=E,
                   router=dict(type=name)).eval()
    layer(torch.randn(2, N, D))
    summary = layer.last_routing
    assert summary.family == FAMILIES[name].family
    assert summary.logits.shape == (2, N, E)
    assert summary.tokens_per_expert().shape == (2, E)
    if summary.family == 'token_choice':
        assert summary.expert_index.shape[:2] == (2, N) and summary.expert_tokens is None
    elif summary.family == 'expert_choice':
        assert summary.expert_tokens.shape[0] == E and summary.expert_index is None
    else:
        assert summary.dispatch_mask is None and summary.combine_weights.shape[:2] == (2, N)
        assert summary.tokens_per_expert().sum().item() == 2 * N  # one expert per token


def test_a_class_that_is_no_router_is_refused():
    with pytest.raises(TypeError, match='is no BaseRouter'):
        build_router(dict(type=torch.nn.Linear), D, E)


def test_groups_must_cover_the_tokens_in_order():
    router = build_router(dict(type='SoftmaxTokenChoiceRouter'), D, E)
    with pytest.raises(ValueError, match='must cover the 24 tokens in order'):
        router(torch.randn(24, D), None, None, groups=[(0, 12)])
