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
