"""Let mmengine 0.10.x resume from its own checkpoints under torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``; mmengine 0.10.7 calls it
without the argument, and its checkpoints hold a few non-tensor objects: the message
hub's ``HistoryBuffer`` (numpy arrays inside) which also pickles its statistics methods
(``getattr(HistoryBuffer, 'min')``, ...). Resuming therefore fails.

The fix keeps loading weights-only (no arbitrary code can run from a checkpoint):
1. allow exactly the types mmengine writes (``HistoryBuffer`` and numpy arrays, dtypes
   and scalars) in torch's safe unpickler;
2. stop ``HistoryBuffer`` from pickling its four built-in statistics methods, which
   every instance gets back from the class anyway (custom ones registered with
   ``HistoryBuffer.register_statistics`` are still written, as before).
Nothing else in mmengine changes and no environment variable is needed.
"""
import re

import numpy as np
import torch

_BUILTIN_STATISTICS = ('min', 'max', 'current', 'mean')


def _mmengine_checkpoint_types() -> list:
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = getattr(np, '_core', np.core).multiarray
    types = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    # numpy >= 1.25 pickles dtypes by their class (np.dtypes.Float64DType, ...)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        types += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith('DType')]
    return types


def _history_buffer_state(self) -> dict:
    """``HistoryBuffer.__getstate__`` without the built-in statistics methods."""
    state = dict(self.__dict__)
    custom = {name: method for name, method in self._statistics_methods.items()
              if name not in _BUILTIN_STATISTICS}
    state.pop('statistics_methods', None)
    if custom:
        state['statistics_methods'] = custom
    return state


def allow_mmengine_checkpoints() -> None:
    """Make mmengine's own checkpoints loadable with ``torch.load(weights_only=True)``."""
    from mmengine.logging.history_buffer import HistoryBuffer

    HistoryBuffer.__getstate__ = _history_buffer_state
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything anyway
        add_safe_globals(_mmengine_checkpoint_types())


#: warnings our dependencies raise on every run, that no damex user can act on
KNOWN_WARNINGS = (
    # mmengine (collect_env, package checks) imports the deprecated pkg_resources
    ('pkg_resources is deprecated as an API', UserWarning),
    # mmdet's DINO calls torch.meshgrid without ``indexing`` (the default is the same)
    ('torch.meshgrid: in an upcoming release, it will be required', UserWarning),
)


def silence_known_warnings() -> None:
    """Hide exactly :data:`KNOWN_WARNINGS` (the entry points call it; importing damex does
    not change any warning filter)."""
    import warnings
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings('ignore', message=re.escape(message), category=category)
