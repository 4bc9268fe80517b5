"""Helpers for damex's tests (as ``mmdet.testing`` for mmdet's): the repository, the demo
config shrunk to seconds, and importing a script under tools/ as a module."""
import importlib.util
import os

from .synthetic.demo_data import ROOT as REPO

__all__ = ['REPO', 'load_tool', 'tiny_demo_config', 'make_moe_layer', 'SPARSE_ROUTERS',
           'ALL_ROUTERS',
           'CROSS_TOKEN_ROUTERS', 'MOE_D', 'MOE_H', 'make_eval_layer']


def load_tool(relative_path: str):
    """Import a script under tools/ (a path relative to the repository) as a module."""
    path = os.path.join(REPO, relative_path)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_demo_config(work_dir, config='configs/demo/damex_demo.py', max_iters=2, **moe):
    """The demo config shrunk for tests: 2 iterations, checkpoint at the end, no eval.

    Without yapf formatting (``format_python_code=False``: the same content, unformatted):
    a Runner formats its config 4 times plus once per checkpoint, ~0.5 s each here.
    (``Config.fromfile`` of mmengine 0.10 drops that argument, hence the copy.)
    """
    from mmengine.config import Config
    loaded = Config.fromfile(os.path.join(REPO, config))
    cfg = Config(loaded.to_dict(), cfg_text=loaded.text, filename=loaded.filename,
                 env_variables=loaded.env_variables, format_python_code=False)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 10 ** 6
    cfg.train_cfg.val_begin = max_iters + 1  # the loop would also validate after the last iter
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.default_hooks.logger.interval = 1
    cfg.model.encoder.num_layers = 1
    cfg.model.num_queries = 20
    cfg.model.dn_cfg.group_cfg.num_dn_queries = 10
    if moe and cfg.model.get('moe') is not None:
        cfg.model.moe.update(moe)
    cfg.randomness = dict(seed=0)
    return cfg


#: embed dims and expert width of the small MoE layers the tests build
MOE_D, MOE_H = 16, 32
SPARSE_ROUTERS = ['SoftmaxTokenChoiceRouter', 'DatasetAwareRouter', 'SinkhornTokenChoiceRouter',
                  'SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
                  'SparsityConstrainedExpertChoiceRouter']
ALL_ROUTERS = SPARSE_ROUTERS + ['SoftMoERouter']
#: routers whose choice for a token depends on the other tokens of its group
CROSS_TOKEN_ROUTERS = ['SinkhornTokenChoiceRouter', 'SoftmaxExpertChoiceRouter',
                       'SinkhornExpertChoiceRouter', 'SparsityConstrainedExpertChoiceRouter']


def make_moe_layer(router: str, num_experts: int = 4, slots_per_expert=None, **kwargs):
    """A seeded small MoEFFN (D=16, H=32) with ``router``; Soft MoE in groups of 8 tokens."""
    import torch

    from .models.moe import MoEFFN
    torch.manual_seed(0)
    cfg = dict(type=router)
    if router == 'SoftMoERouter':
        cfg.update(tokens_per_group=8)
        if slots_per_expert is not None:
            cfg.update(slots_per_expert=slots_per_expert)
    return MoEFFN(embed_dims=MOE_D, feedforward_channels=MOE_H, num_experts=num_experts,
                  router=cfg, **kwargs)


def make_eval_layer(router: str, **kwargs):
    """:func:`make_moe_layer` in eval mode (no gate noise)."""
    return make_moe_layer(router, **kwargs).eval()
