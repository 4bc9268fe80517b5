"""damex: Dataset-aware Mixture-of-Experts (DAMEX) for MMDetection 3.x.

``import damex`` (or ``custom_imports = dict(imports=['damex'])`` in a config) registers
every module of the package in mmdet's registries and makes mmengine able to resume from
its own checkpoints under torch >= 2.6.
"""
import importlib.util
import warnings

from .compat import allow_mmengine_checkpoints

__version__ = '0.1.0'

allow_mmengine_checkpoints()

from . import models  # noqa: E402  (the MoE layer and routers need no compiled ops)

if importlib.util.find_spec('mmcv._ext') is not None:
    from . import datasets, engine, evaluation, visualization  # noqa: E402,F401
    from .models import dense_heads, detectors  # noqa: E402,F401
else:
    warnings.warn('mmcv has no compiled ops (mmcv-lite?): only damex.models.moe is available; '
                  'install full mmcv (tools/install.sh) for the detector, datasets and metrics')
