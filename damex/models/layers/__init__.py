"""Transformer pieces DAMEX-DINO swaps into mmdet's DINO."""
from .dataset_scoped_cdn import DatasetScopedCdnQueryGenerator

__all__ = ['DatasetScopedCdnQueryGenerator']
