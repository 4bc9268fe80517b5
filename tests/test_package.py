"""The package registers itself, configs inherit mmdet's, and runs save and resume."""
import os

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from damex.testing import REPO, tiny_demo_config


def test_import_registers_everything():
    import damex  # noqa: F401
    from mmdet.registry import DATA_SAMPLERS, DATASETS, METRICS, MODELS
    for name in ('MoEFFN', 'DAMEXDINO', 'DatasetAwareDINOHead', 'DatasetAwareRouter',
                 'SoftmaxTokenChoiceRouter', 'SinkhornTokenChoiceRouter',
                 'SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
                 'SparsityConstrainedExpertChoiceRouter', 'SoftMoERouter'):
        assert MODELS.get(name) is not None, name
    for name in ('DatasetMixture', 'DOTADataset', 'XMLFolderDataset'):
        assert DATASETS.get(name) is not None, name
    assert METRICS.get('PerDatasetCocoMetric') is not None
    assert DATA_SAMPLERS.get('MixtureSampler') is not None


def test_config_uses_custom_imports_and_mmdet_inheritance():
    cfg = Config.fromfile(os.path.join(REPO, 'configs/demo/damex_demo.py'))
    assert cfg.custom_imports == dict(imports=['damex'], allow_failed_imports=False)
    # inherited from mmdet's DINO config, overridden where the demo says so
    assert cfg.model.type == 'DAMEXDINO'
    assert cfg.model.as_two_stage and cfg.model.with_box_refine
    assert cfg.model.backbone.depth == 18
    assert cfg.model.bbox_head.loss_bbox.loss_weight == 5.0


@pytest.mark.slow  # trains or spawns a process
def test_runner_trains_saves_and_resumes(tmp_path, demo_data):
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    runner = Runner.from_cfg(cfg)
    runner.train()
    checkpoint = tmp_path / 'iter_2.pth'
    assert checkpoint.exists()
    # the checkpoint loads with torch's safe (weights-only) unpickler: the compat fix
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    assert state['meta']['iter'] == 2 and 'message_hub' in state

    cfg = tiny_demo_config(tmp_path, max_iters=4)
    cfg.resume = True
    cfg.load_from = str(checkpoint)
    resumed = Runner.from_cfg(cfg)
    resumed.load_or_resume()
    assert resumed.iter == 2
    assert torch.equal(resumed.model.state_dict()['query_embedding.weight'],
                       state['state_dict']['query_embedding.weight'])
    resumed.train()
    assert resumed.iter == 4
    assert (tmp_path / 'iter_4.pth').exists()
