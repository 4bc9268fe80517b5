"""Build a router from its config, with errors that say what to change."""
import inspect

from mmdet.registry import MODELS
from .base import BaseRouter


def build_router(cfg: dict, embed_dims: int, num_experts: int,
                 capacity_multiple_of: int = 1) -> BaseRouter:
    """Build a router from its config (``embed_dims``, ``num_experts`` and
    ``capacity_multiple_of`` filled in by the layer), with a clear error for an unknown
    type, for a class that is no :class:`BaseRouter` and for arguments it does not take."""
    cfg = dict(cfg)
    router_type = cfg.pop('type', None)
    cfg.setdefault('embed_dims', embed_dims)
    cfg.setdefault('num_experts', num_experts)

    def build(router_cls):
        if not (isinstance(router_cls, type) and issubclass(router_cls, BaseRouter)):
            raise TypeError(f'router {router_cls!r} is no BaseRouter (damex.models.moe.routers'
                            '.base): a router takes (tokens, targets, capacity_factor, groups)')
        cfg.setdefault('capacity_multiple_of', capacity_multiple_of)
        accepted = inspect.signature(router_cls.__init__).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            unknown = [key for key in cfg if key not in accepted]
            if unknown:
                raise TypeError(
                    f'router {router_cls.__name__} does not take {", ".join(unknown)} (it '
                    f'takes {", ".join(k for k in accepted if k != "self")}); changing only '
                    f'the router type keeps the old router\'s arguments: replace the whole '
                    f'router config (router=dict(_delete_=True, type={router_cls.__name__!r}, '
                    f'...) in a config) or remove those keys')
        return router_cls(**cfg)

    from . import __all__ as router_names  # the package registers every router
    if isinstance(router_type, type):
        return build(router_type)
    # Look our own routers up directly: MODELS.get would import all of mmdet.models
    # (and mmcv.ops), which the layer does not need.
    router_cls = MODELS.module_dict.get(router_type) if isinstance(router_type, str) else None
    if router_cls is None and isinstance(router_type, str):
        router_cls = MODELS.get(router_type)
    if router_cls is None:
        raise ValueError(f'unknown router type {router_type!r}; registered routers: '
                         f'{", ".join(n for n in router_names if n in MODELS.module_dict)}')
    return build(router_cls)
