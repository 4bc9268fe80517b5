"""Keep chosen lines of mmengine's log out of it (and know what they said)."""
import contextlib
import logging
import re
from typing import Iterator, List, Sequence

from mmengine.logging import MMLogger


class _Held(logging.Filter):
    def __init__(self, patterns: Sequence[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.matches: List[re.Match] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern in self.patterns:
            match = pattern.match(message)
            if match:
                self.matches.append(match)
                return False
        return True


@contextlib.contextmanager
def held_log_lines(*patterns: str) -> Iterator[List[re.Match]]:
    """Within the block, lines of the current mmengine logger that match one of the
    regular expressions are not logged; the list it yields collects their matches."""
    logger = MMLogger.get_current_instance()
    held = _Held(patterns)
    logger.addFilter(held)
    try:
        yield held.matches
    finally:
        logger.removeFilter(held)
