"""Detectors: DAMEX-DINO."""
from .damex_dino import DAMEXDINO

__all__ = ['DAMEXDINO']
