"""Runner hooks and the optimizer-wrapper constructor."""
from .checkpoint import CrashSafeCheckpointHook
from .hooks import ExpertMapCheckHook, ForcedRoutingHook, RandomStateHook
from .optim import QuietOptimWrapperConstructor

__all__ = ['CrashSafeCheckpointHook', 'ExpertMapCheckHook', 'ForcedRoutingHook',
           'QuietOptimWrapperConstructor', 'RandomStateHook']
