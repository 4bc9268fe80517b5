"""Runner hooks."""
from .hooks import ExpertMapCheckHook, RandomStateHook

__all__ = ['ExpertMapCheckHook', 'RandomStateHook']
