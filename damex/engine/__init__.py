"""Runner hooks."""
from .checkpoint import CrashSafeCheckpointHook
from .hooks import ExpertMapCheckHook, ForcedRoutingHook, RandomStateHook

__all__ = ['CrashSafeCheckpointHook', 'ExpertMapCheckHook', 'ForcedRoutingHook',
           'RandomStateHook']
