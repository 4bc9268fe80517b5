"""Mixture-of-Experts FFN layers and routers.

Importable without the detector (no mmcv.ops), so the layer can be benchmarked with
mmcv-lite on its own.
"""
from .experts import StackedExperts
from .layer import MoEFFN, build_router, routing_targets, upcycle_from_ffn
from .routers import *  # noqa: F401,F403
from .routers import __all__ as _router_names
from .routing import SoftRouting, SparseRouting, compute_capacity

__all__ = ['MoEFFN', 'StackedExperts', 'SparseRouting', 'SoftRouting', 'build_router',
           'compute_capacity', 'routing_targets', 'upcycle_from_ffn', *_router_names]
