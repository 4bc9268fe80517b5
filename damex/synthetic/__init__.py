"""Deterministic synthetic mixtures: the demo (``make demo``, the tests) and the held-out
benchmark (tools/analysis_tools/compare_variants.py). The CLIs are
tools/misc/make_demo_data.py and tools/misc/make_heldout_data.py."""
from .demo_data import make_demo_data
from .heldout_data import make_heldout_data

__all__ = ['make_demo_data', 'make_heldout_data']
