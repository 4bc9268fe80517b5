"""The held-out benchmark's variants build the models they name (no training here)."""
import os.path as osp

from mmdet.registry import MODELS

from damex.testing import load_tool


def test_shared_expert_and_aux_free_variants_build(tmp_path):
    tool = load_tool('tools/analysis_tools/compare_variants.py')
    root = str(tmp_path / 'heldout')  # no data is read to build a config and a model
    shared = tool.variant_config('damex-shared', root, 0, 10, str(tmp_path / 'a'))
    model = MODELS.build(shared.model)
    layers = model.moe_layers.values()
    assert layers and all(layer.shared_expert is not None for layer in layers)
    assert {layer.shared_expert.feedforward_channels for layer in layers} == {
        tool.SHARED_EXPERT_WIDTH}
    auxfree = tool.variant_config('moe-auxfree', root, 0, 10, str(tmp_path / 'b'))
    model = MODELS.build(auxfree.model)
    routers = [layer.router for layer in model.moe_layers.values()]
    assert routers and all(r.balance == 'aux_free' and not r.use_importance_loss
                           and not r.use_load_loss for r in routers)
    assert not osp.exists(root)


def test_table_and_separated_pairs_from_bootstrap_intervals():
    tool = load_tool('tools/analysis_tools/compare_variants.py')
    names = [name for name, _, _ in tool.DATASETS]
    boot = {
        'dense': dict(aware={**{n: (0.1, 0.05, 0.15) for n in names}, 'mean': (0.1, 0.08, 0.12)},
                      agnostic=(0.05, 0.03, 0.07)),
        'moe': dict(aware={**{n: (0.2, 0.1, 0.3) for n in names}, 'mean': (0.2, 0.15, 0.25)},
                    agnostic=(0.1, 0.05, 0.15)),
        'damex-hand': dict(aware={**{n: (0.13, 0.1, 0.2) for n in names},
                                  'mean': (0.13, 0.11, 0.16)}, agnostic=(0.1, 0.05, 0.15)),
    }
    runs = [dict(variant=v, metrics={'routing/accuracy': 0.5}, routing_at_10pct=0.4,
                 seconds_per_iter=1.0) for v in boot]
    lines = tool.table(runs, 100, boot).splitlines()
    assert len(lines) == 2 + 3 and lines[0].count('|') == len(lines[2].split('|')) - 1
    assert '0.200 [0.150, 0.250]' in lines[3] and '0.100 [0.050, 0.150]' in lines[3]
    # dense's mean [0.08, 0.12] lies below moe's [0.15, 0.25]; damex-hand overlaps both
    assert tool.separated_pairs(boot) == [('moe', 'dense')]
