"""damex: Dataset-aware Mixture-of-Experts for MMDetection 3.x."""
__version__ = '0.1.0'
