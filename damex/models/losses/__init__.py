"""Losses of the dataset-aware head."""
from .dataset_scoped_loss import DatasetScopedLoss

__all__ = ['DatasetScopedLoss']
