"""Models: the MoE FFN layer and its routers (``moe``), DAMEX-DINO and its head.

``moe`` needs no compiled mmcv ops; the detector and head are imported by ``damex``
when full mmcv is installed.
"""
from . import moe  # noqa: F401
