"""Runner hooks."""
from .hooks import ExpertMapCheckHook, ForcedRoutingHook, RandomStateHook

__all__ = ['ExpertMapCheckHook', 'ForcedRoutingHook', 'RandomStateHook']
