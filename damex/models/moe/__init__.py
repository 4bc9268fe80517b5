"""Mixture-of-Experts FFN layers and routers.

Importable without the detector (no mmcv.ops), so the layer can be benchmarked with
mmcv-lite on its own.
"""
from .experts import StackedExperts
from .layer import MoEFFN, routing_targets, upcycle_from_ffn
from .routers import *  # noqa: F401,F403
from .routers import __all__ as _router_names
from .routers import build_router
from .routing import (ExpertChoiceRouting, RoutingSummary, SoftRouting, SparseRouting,
                      TokenChoiceRouting, compute_capacity)

__all__ = ['MoEFFN', 'StackedExperts', 'SparseRouting', 'TokenChoiceRouting',
           'ExpertChoiceRouting', 'SoftRouting', 'RoutingSummary', 'build_router',
           'compute_capacity', 'routing_targets', 'upcycle_from_ffn', *_router_names]
