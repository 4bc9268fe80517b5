"""DAMEX-DINO: mmdet's DINO whose chosen transformer FFNs are Mixture-of-Experts layers."""
import copy
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from mmdet.models.detectors import DINO
from mmdet.registry import MODELS
from mmdet.structures import OptSampleList, SampleList
from ...evaluation.routing_stats import tokens_per_expert
from ..moe import MoEFFN, routing_targets

DEFAULT_MOE = dict(
    num_experts=8,
    router=dict(type='DatasetAwareRouter'),
    encoder_layers=[],
    decoder_layers=[0, 2, 4],  # every other decoder layer, as the paper
    capacity_factor=None,
    eval_capacity_factor=None,
    # V-MoE weighs importance and load 0.005 each; DAMEX 0.1 (official code).
    aux_loss_weights=dict(damex=0.1, importance=0.005, load=0.005, switch=0.01, z=0.001),
)


@MODELS.register_module()
class DAMEXDINO(DINO):
    """DINO with MoE FFNs in the configured encoder / decoder layers.

    Args:
        moe: ``dict(num_experts, router, encoder_layers, decoder_layers, capacity_factor,
            eval_capacity_factor, aux_loss_weights)``; missing keys take ``DEFAULT_MOE``.
            ``moe=None`` keeps every FFN dense (plain DINO).

    Routing targets: in ``loss`` (and whenever every sample has one) each image's
    ``data_sample.metainfo['expert_id']`` is handed to the MoE layers in batch order,
    for the duration of the transformer forward only. ``predict`` needs none.

    Losses: ``loss_<key>`` for each auxiliary loss key the routers report ('damex',
    'importance', 'load', 'switch', 'z'), the mean over the MoE layers that report it,
    times ``aux_loss_weights[key]``.
    """

    def __init__(self, *args, moe: Optional[dict] = None, **kwargs):
        # set before super().__init__, which calls _init_layers
        self.moe_cfg = None if moe is None else {**copy.deepcopy(DEFAULT_MOE), **moe}
        if self.moe_cfg is not None:
            weights = {**DEFAULT_MOE['aux_loss_weights'], **(moe.get('aux_loss_weights') or {})}
            self.moe_cfg['aux_loss_weights'] = weights
        super().__init__(*args, **kwargs)

    def _init_layers(self) -> None:
        super()._init_layers()
        if self.moe_cfg is None:
            return
        for part in ('encoder', 'decoder'):
            layers = getattr(self, part).layers
            for index in self.moe_cfg[f'{part}_layers']:
                if not 0 <= index < len(layers):
                    raise ValueError(f'moe.{part}_layers: layer {index} does not exist, the '
                                     f'{part} has {len(layers)} layers')
                layers[index].ffn = self._build_moe_ffn(layers[index])
                layers[index].ffn.name = f'{part}.layers.{index}.ffn'

    def _build_moe_ffn(self, layer: nn.Module) -> MoEFFN:
        ffn_cfg = dict(layer.ffn_cfg)
        dense = layer.ffn
        return MoEFFN(
            embed_dims=dense.embed_dims,
            feedforward_channels=dense.feedforward_channels,
            num_experts=self.moe_cfg['num_experts'],
            router=self.moe_cfg['router'],
            capacity_factor=self.moe_cfg['capacity_factor'],
            eval_capacity_factor=self.moe_cfg['eval_capacity_factor'],
            act_cfg=ffn_cfg.get('act_cfg', dict(type='ReLU', inplace=True)),
            ffn_drop=ffn_cfg.get('ffn_drop', 0.0),
            add_identity=ffn_cfg.get('add_identity', True))

    @property
    def moe_layers(self) -> Dict[str, MoEFFN]:
        """The MoE layers by module name, e.g. 'decoder.layers.0.ffn'."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoEFFN)}

    @property
    def num_experts(self) -> Optional[int]:
        return None if self.moe_cfg is None else self.moe_cfg['num_experts']

    def init_weights(self) -> None:
        """DINO's init, then per-expert xavier (DINO's xavier sees (E, out, in) fans)."""
        super().init_weights()
        for layer in self.moe_layers.values():
            layer.experts.xavier_init_()

    def routing_targets_of(self, batch_data_samples: OptSampleList) -> Optional[Tensor]:
        """(B,) expert of each image's dataset in batch order, or None if any is unknown."""
        if not batch_data_samples:
            return None
        experts = [s.metainfo.get('expert_id') for s in batch_data_samples]
        if any(e is None for e in experts):
            return None
        num_experts = self.num_experts
        for sample, expert in zip(batch_data_samples, experts):
            if num_experts is not None and not 0 <= expert < num_experts:
                raise ValueError(f'image {sample.metainfo.get("img_path")} of dataset '
                                 f'{sample.metainfo.get("dataset_name")!r} is mapped to expert '
                                 f'{expert}, but the model has {num_experts} experts')
        return torch.tensor(experts, dtype=torch.long, device=self.query_embedding.weight.device)

    def forward_transformer(self, img_feats, batch_data_samples: OptSampleList = None) -> Dict:
        targets = self.routing_targets_of(batch_data_samples) if self.moe_cfg else None
        with routing_targets(self, targets):
            return super().forward_transformer(img_feats, batch_data_samples)

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict:
        losses = super().loss(batch_inputs, batch_data_samples)
        losses.update(self.moe_losses())
        return losses

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList,
                rescale: bool = True) -> SampleList:
        """DINO's predict; each sample also gets ``routing_counts`` (L, E), the tokens of
        the image that reached each expert in each MoE layer (``routing_layers`` in its
        metainfo names the layers), for the routing analysis."""
        results = super().predict(batch_inputs, batch_data_samples, rescale)
        layers = self.moe_layers
        if layers:
            counts = torch.stack([tokens_per_expert(layer.last_routing)
                                  for layer in layers.values()], dim=1)  # (B, L, E)
            for sample, sample_counts in zip(results, counts):
                sample.routing_counts = sample_counts
                sample.set_metainfo(dict(routing_layers=tuple(layers)))
        return results

    def moe_losses(self) -> Dict[str, Tensor]:
        """Weighted auxiliary losses of the last forward, each averaged over the MoE layers."""
        collected: Dict[str, List[Tensor]] = {}
        for layer in self.moe_layers.values():
            for key, value in layer.aux_losses.items():
                collected.setdefault(key, []).append(value)
        weights = self.moe_cfg['aux_loss_weights'] if self.moe_cfg else {}
        return {f'loss_{key}': weights.get(key, 0.0) * torch.stack(values).mean()
                for key, values in collected.items()}
