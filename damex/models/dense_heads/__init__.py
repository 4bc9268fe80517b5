"""Detection heads."""
from .dataset_aware_dino_head import DatasetAwareDINOHead

__all__ = ['DatasetAwareDINOHead']
