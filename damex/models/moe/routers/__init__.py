"""Routers, one module per family; importing this registers them all in mmdet's MODELS."""
from .base import BaseRouter, GatedRouter
from .build import build_router
from .expert_choice import (SinkhornExpertChoiceRouter, SoftmaxExpertChoiceRouter,
                            SparsityConstrainedExpertChoiceRouter)
from .soft_moe import SoftMoERouter
from .token_choice import DatasetAwareRouter, SinkhornTokenChoiceRouter, SoftmaxTokenChoiceRouter

__all__ = [
    'BaseRouter', 'GatedRouter', 'DatasetAwareRouter', 'SoftmaxTokenChoiceRouter', 'SinkhornTokenChoiceRouter',
    'SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
    'SparsityConstrainedExpertChoiceRouter', 'SoftMoERouter'
]
