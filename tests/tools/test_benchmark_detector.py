"""The detector benchmark's stock DINO: built from the DAMEX config it is compared with."""
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmdet.models.dense_heads import DINOHead
from mmdet.registry import MODELS

from damex.testing import REPO, load_tool


def test_stock_dino_builds_from_the_default_damex_config():
    # the UODB configs set loss_scope='all' on the dataset-aware head: mmdet's DINOHead has
    # no such argument, so the benchmark failed before it timed anything
    bench = load_tool('tools/benchmark_detector.py')
    init_default_scope('mmdet')
    cfg = Config.fromfile(f'{REPO}/configs/damex/damex-dino-e8_r50_4scale_8xb2-12e_uodb.py')
    assert cfg.model.bbox_head.loss_scope == 'all'
    damex_cfg = cfg.model
    damex_cfg.backbone.init_cfg = None
    stock_cfg = bench.stock_dino_config(damex_cfg)
    model = MODELS.build(stock_cfg)
    assert type(model.bbox_head) is DINOHead
    assert 'moe' not in stock_cfg and 'moe' in damex_cfg
    assert model.bbox_head.num_classes == damex_cfg.bbox_head.num_classes
