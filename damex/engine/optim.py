"""An optimizer-wrapper constructor that reports paramwise settings in a few lines."""
from collections import Counter, defaultdict
from typing import Dict, List

from mmengine.logging import MMLogger
from mmengine.optim import DefaultOptimWrapperConstructor

from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
from .log_lines import held_log_lines

PARAMWISE = r'^paramwise_options -- (?P<name>[^:]+):(?P<key>\w+)=(?P<value>.*)$'
FROZEN = r'^(?P<frozen>\S+) is skipped since its requires_grad=False$'


def _modules(names: List[str]) -> str:
    tops = Counter(name.split('.')[0] for name in names)
    return ', '.join(f'{top} ({count})' for top, count in tops.most_common())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class QuietOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's ``DefaultOptimWrapperConstructor``, which logs one line per parameter
    and setting (``paramwise_options -- ...``) and a warning per frozen parameter (some
    100 lines for DINO), logging instead one line per distinct setting and one for the
    frozen parameters, with how many parameters of which top-level modules each covers.
    The optimizer is the same."""

    def __call__(self, model):
        with held_log_lines(PARAMWISE, FROZEN) as lines:
            optim_wrapper = super().__call__(model)
        settings: Dict[str, Dict[str, str]] = defaultdict(dict)
        frozen = []
        for match in lines:
            if 'frozen' in match.groupdict():
                frozen.append(match['frozen'])
            else:
                settings[match['name']][match['key']] = match['value']
        logger = MMLogger.get_current_instance()
        by_setting: Dict[tuple, List[str]] = defaultdict(list)
        for name, setting in settings.items():
            by_setting[tuple(sorted(setting.items()))].append(name)
        for setting, names in by_setting.items():
            values = ', '.join(f'{key}={value}' for key, value in setting)
            logger.info(f'paramwise_cfg: {len(names)} parameters get {values}: '
                        f'{_modules(names)}')
        if frozen:
            logger.info(f'paramwise_cfg: {len(frozen)} frozen parameters '
                        f'(requires_grad=False) are not optimised: {_modules(frozen)}')
        return optim_wrapper
