"""Count what a loader ignored or skipped, and say so once per file set (nothing silent)."""
import warnings
from collections import Counter
from typing import Dict


class AnnotationReport:
    """Collects skipped and ignored objects by reason, with an example location for each."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.skipped: Counter = Counter()
        self.ignored: Counter = Counter()
        self.examples: Dict[str, str] = {}

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)

    def ignore(self, reason: str) -> None:
        self.ignored[reason] += 1

    def warn(self) -> None:
        """Emit one Python warning that lists every reason with its count and an example."""
        if not self.skipped:
            return
        details = '; '.join(f'{n} {reason} (e.g. {self.examples[reason]})'
                            for reason, n in self.skipped.items())
        warnings.warn(f'{self.dataset}: skipped {sum(self.skipped.values())} objects: {details}',
                      stacklevel=3)

    def summary(self) -> str:
        parts = [f'skipped {n} {r}' for r, n in self.skipped.items()]
        parts += [f'marked {n} {r} as ignore' for r, n in self.ignored.items()]
        return ', '.join(parts) if parts else 'nothing skipped or ignored'
