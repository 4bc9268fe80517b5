"""Op counts: a hardware-independent cost of a step (on a GPU, each top-level op launches)."""
from typing import Callable

import torch


def count_top_level_ops(step: Callable[[], None]) -> int:
    """aten ops that ``step`` runs (forward and backward) whose parent is not an aten op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.profiler.function_events if e.name.startswith('aten::') and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::')))
