"""DINO's contrastive denoising queries with label noise drawn from each image's dataset."""
from typing import Optional

import torch
from torch import Tensor

from mmdet.models.layers.transformer.dino_layers import CdnQueryGenerator


class DatasetScopedCdnQueryGenerator(CdnQueryGenerator):
    """``CdnQueryGenerator`` whose noisy labels replace a ground-truth label with a class of
    the same image's dataset (``label_map`` in the sample's metainfo), not with any class
    of the unified space: with ``loss_scope='dataset'`` an image never learns about other
    datasets' classes. Samples without a ``label_map`` get mmdet's behaviour.
    """

    _choices: Optional[tuple] = None

    def __call__(self, batch_data_samples):
        label_maps = [s.metainfo.get('label_map') for s in batch_data_samples]
        if all(m is not None for m in label_maps):
            device = batch_data_samples[0].gt_instances.labels.device
            image = torch.cat([torch.full((len(s.gt_instances), ), i, device=device)
                               for i, s in enumerate(batch_data_samples)]).long()
            count = torch.tensor([len(m) for m in label_maps], device=device)
            table = torch.zeros(len(label_maps), int(count.max()), dtype=torch.long,
                                device=device)
            for row, label_map in zip(table, label_maps):
                row[:len(label_map)] = torch.as_tensor(label_map, device=device)
            self._choices = (image, count, table)
        try:
            return super().__call__(batch_data_samples)
        finally:
            self._choices = None

    def generate_dn_label_query(self, gt_labels: Tensor, num_groups: int) -> Tensor:
        if self._choices is None:
            return super().generate_dn_label_query(gt_labels, num_groups)
        image, count, table = self._choices
        labels = gt_labels.repeat(2 * num_groups, 1).view(-1)  # as mmdet: 2 per group
        image = image.repeat(2 * num_groups, 1).view(-1)
        chosen = torch.nonzero(torch.rand_like(labels.float()) < self.label_noise_scale * 0.5)
        chosen = chosen.view(-1)
        chosen_image = image[chosen]
        pick = (torch.rand(len(chosen), device=labels.device) * count[chosen_image]).long()
        pick = torch.minimum(pick, count[chosen_image] - 1)
        noisy = labels.scatter(0, chosen, table[chosen_image, pick])
        return self.label_embedding(noisy)
