"""A classification loss that, for every query, counts only its image's dataset's classes."""
import contextlib
from typing import Iterator, Optional, Union

from torch import Tensor, nn

from mmdet.registry import MODELS


@MODELS.register_module()
class DatasetScopedLoss(nn.Module):
    """Wraps a sigmoid classification loss (focal, BCE) with per-(query, class) weights.

    Inside :meth:`scoped` (the head enters it around each loss computation, with the class
    mask of the images of the batch) the weight of every (query, class) pair outside the
    query's dataset is 0: another dataset's classes are neither positives nor negatives.
    Outside it the loss is the wrapped one, unchanged.

    Args:
        loss: the wrapped loss, as a config or a module.
    """

    def __init__(self, loss: Union[dict, nn.Module]):
        super().__init__()
        self.loss = MODELS.build(loss) if isinstance(loss, dict) else loss
        self._mask: Optional[Tensor] = None

    @property
    def use_sigmoid(self) -> bool:  # mmdet's DETR heads read it
        return self.loss.use_sigmoid

    @property
    def loss_weight(self) -> float:
        return self.loss.loss_weight

    @contextlib.contextmanager
    def scoped(self, mask: Optional[Tensor]) -> Iterator[None]:
        """mask: (N, C) 1 where query n may be scored for class c (None: no scope)."""
        self._mask = mask
        try:
            yield
        finally:
            self._mask = None

    def forward(self, pred: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                avg_factor=None, **kwargs) -> Tensor:
        if self._mask is not None:
            mask = self._mask.to(pred.dtype)
            weight = mask if weight is None else weight.reshape(-1, 1).to(pred.dtype) * mask
        return self.loss(pred, target, weight, avg_factor=avg_factor, **kwargs)
