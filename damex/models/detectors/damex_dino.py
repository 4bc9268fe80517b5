"""DAMEX-DINO: mmdet's DINO whose chosen transformer FFNs are Mixture-of-Experts layers."""
import contextlib
import copy
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from mmdet.models.detectors import DINO
from mmdet.registry import MODELS
from mmdet.structures import OptSampleList, SampleList
from ...datasets.label_space import (LABEL_SPACE_CAPACITY, ExpertPlan, LabelSpace, check_expert,
                                     label_space_from_buffer, label_space_to_buffer)
from ..checkpoint_match import CheckpointMismatchError, describe_mismatch
from ..dense_heads import DatasetAwareDINOHead
from ..layers import DatasetScopedCdnQueryGenerator
from ..moe import MoEFFN, routing_targets
from ..moe.telemetry import routing_telemetry, tokens_per_expert

#: where checkpoints of earlier releases kept the label space (the head); loaded from there too
LEGACY_LABEL_SPACE_KEY = 'bbox_head.label_space_bytes'

DEFAULT_MOE = dict(
    num_experts=8,
    router=dict(type='DatasetAwareRouter'),
    encoder_layers=[],
    decoder_layers=[0, 2, 4],  # every other decoder layer, as the paper
    capacity_factor=None,
    eval_capacity_factor=None,
    capacity_multiple_of=1,
    group_size='image',  # routing groups: an image's boxes never depend on its batch-mates
    shared_expert=None,  # or dict(feedforward_channels=H_s): a dense path beside the experts
    # V-MoE weighs importance and load 0.005 each; DAMEX 0.1 (official code).
    aux_loss_weights=dict(damex=0.1, importance=0.005, load=0.005, switch=0.01, z=0.001),
)


@MODELS.register_module()
class DAMEXDINO(DINO):
    """DINO with MoE FFNs in the configured encoder / decoder layers.

    Args:
        moe: ``dict(num_experts, router, encoder_layers, decoder_layers, capacity_factor,
            eval_capacity_factor, capacity_multiple_of, group_size, shared_expert,
            aux_loss_weights)``
            (see :class:`~damex.models.moe.MoEFFN`); missing keys take ``DEFAULT_MOE``.
            ``moe=None`` keeps every FFN dense (plain DINO).

    Routing targets: in ``loss`` (and whenever every sample has one) each image's
    ``data_sample.metainfo['expert_id']`` is handed to the MoE layers in batch order,
    for the duration of the transformer forward only. ``predict`` needs none.

    Losses: ``loss_<key>`` for each auxiliary loss key the routers report ('damex',
    'importance', 'load', 'switch', 'z'), the mean over the MoE layers that report it,
    times ``aux_loss_weights[key]``.

    Label space: the detector holds the label space of its training mixture
    (:attr:`label_space`, adopted from the training batches, checked against
    ``bbox_head.num_classes`` and ``moe.num_experts``, saved in checkpoints in the buffer
    ``label_space_bytes``). From it come every image's routing target (its dataset's
    expert, matched by name, whatever the test mixture says) and, in ``predict``, the
    class tables the head scores with (``score_classes``, ``output_labels`` in the
    metainfo): a test mixture may hold any subset of the training datasets in any order,
    and a dataset or class the model was not trained on is an error naming it. With a
    dataset-aware head and ``loss_scope='dataset'`` the denoising label noise stays within
    each image's dataset.

    Checkpoints: loading a state dict that does not match the model (missing, unexpected
    or reshaped keys) is a :class:`CheckpointMismatchError`, whoever loads it (mmengine's
    runner, ``init_detector``, ``DetInferencer``, torch's ``load_state_dict`` with
    ``strict=True``), unless ``allow_partial_checkpoint`` is set: damex's checkpoint hook
    sets it for fine-tuning (``load_from`` in training), which stays non-strict.
    """

    def __init__(self, *args, moe: Optional[dict] = None, **kwargs):
        # set before super().__init__, which calls _init_layers
        self.moe_cfg = None if moe is None else {**copy.deepcopy(DEFAULT_MOE), **moe}
        if self.moe_cfg is not None:
            weights = {**DEFAULT_MOE['aux_loss_weights'], **(moe.get('aux_loss_weights') or {})}
            self.moe_cfg['aux_loss_weights'] = weights
        dn_cfg = kwargs.get('dn_cfg')  # DINO completes it (num_classes, ...) in place
        super().__init__(*args, **kwargs)
        if getattr(self.bbox_head, 'loss_scope', 'all') == 'dataset' and dn_cfg is not None:
            self.dn_query_generator = self._dataset_scoped(self.dn_query_generator, dn_cfg)
        self.label_space: Optional[LabelSpace] = None
        self.register_buffer('label_space_bytes',
                             torch.zeros(LABEL_SPACE_CAPACITY, dtype=torch.uint8))
        self._label_space_source: Optional[dict] = None
        self._loaded_without_label_space = False
        self._tables: Dict[tuple, Tuple[tuple, Optional[tuple]]] = {}
        self.allow_partial_checkpoint = False
        self._register_load_state_dict_pre_hook(self._check_checkpoint)

    @staticmethod
    def _dataset_scoped(plain: nn.Module, dn_cfg: dict) -> DatasetScopedCdnQueryGenerator:
        """The dataset-scoped generator with the plain one's state (and the random stream
        left as DINO's init left it): it only changes how noisy labels are drawn."""
        with torch.random.fork_rng(devices=[]):
            scoped = DatasetScopedCdnQueryGenerator(**dn_cfg)
        scoped.load_state_dict(plain.state_dict())
        return scoped

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Restore the trained label space (from today's key, or from the head's, where
        earlier releases saved it); the pre-hook then checks the rest of the state dict."""
        key, legacy = prefix + 'label_space_bytes', prefix + LEGACY_LABEL_SPACE_KEY
        if legacy in state_dict:
            value = state_dict.pop(legacy)
            state_dict.setdefault(key, value)
        space = label_space_from_buffer(state_dict[key]) if key in state_dict else None
        if key in state_dict:
            state_dict[key] = label_space_to_buffer(space, self.label_space_bytes)
        self.label_space, self._label_space_source = space, None
        self._loaded_without_label_space = space is None
        self._tables.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_checkpoint(self, state_dict, prefix, *args) -> None:
        """Pre-hook of every load (mmengine's loader passes strict=True whatever its flag)."""
        if prefix or self.allow_partial_checkpoint:
            return
        problem = describe_mismatch(self, state_dict)
        if problem:
            raise CheckpointMismatchError(problem)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's ``load_state_dict``; ``strict=False`` is the caller's choice, as in torch."""
        allowed, self.allow_partial_checkpoint = self.allow_partial_checkpoint, (
            self.allow_partial_checkpoint or not strict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self.allow_partial_checkpoint = allowed

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
            capacity_multiple_of=self.moe_cfg['capacity_multiple_of'],
            group_size=self.moe_cfg['group_size'],
            shared_expert=self.moe_cfg['shared_expert'],
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
        """DINO's init, then per-expert xavier (DINO's xavier sees (E, out, in) fans), and
        routers with ``init_from_plan`` from their layer's entry of the plan."""
        super().init_weights()
        for name, layer in self.moe_layers.items():
            layer.experts.xavier_init_()
            plan_file = getattr(layer.router, 'init_from_plan', None)
            if plan_file:
                plan = ExpertPlan.read(plan_file)
                layer.router.init_gate_from_plan(plan.layer(name), plan.experts, plan.path)

    def routing_targets_of(self, batch_data_samples: OptSampleList) -> Optional[Tensor]:
        """(B,) expert of each image's dataset in batch order, or None if any is unknown.

        The expert is the trained expert map's when the model knows the image's dataset,
        else the sample's ``expert_id``.
        """
        if not batch_data_samples:
            return None
        experts = []
        for sample in batch_data_samples:
            name = sample.metainfo.get('dataset_name')
            if self.label_space is not None and name in self.label_space.names:
                experts.append(self.label_space.expert_of(name))
                continue
            expert = sample.metainfo.get('expert_id')
            if expert is None:
                return None
            check_expert(expert, self.num_experts, name,
                         f' (image {sample.metainfo.get("img_path")})')
            experts.append(expert)
        return torch.tensor(experts, dtype=torch.long, device=self.query_embedding.weight.device)

    def forward_transformer(self, img_feats, batch_data_samples: OptSampleList = None) -> Dict:
        targets = self.routing_targets_of(batch_data_samples) if self.moe_cfg else None
        with routing_targets(self, targets):
            return super().forward_transformer(img_feats, batch_data_samples)

    # --- the trained label space: adopted in training, saved and restored with the weights ---
    def adopt_label_space(self, batch_data_samples: SampleList) -> None:
        """Make the training batch's label space the model's (checks the head's num_classes
        and the experts against it)."""
        spaces = [s.metainfo.get('label_space') for s in batch_data_samples]
        if not spaces or spaces[0] is None:
            return
        if any(space is not spaces[0] and space != spaces[0] for space in spaces[1:]):
            raise ValueError('a training batch mixes samples of different label spaces')
        self.set_label_space(spaces[0])

    def set_label_space(self, space_dict: dict) -> None:
        """Adopt a label space (plain data, as the mixture's metainfo holds it)."""
        if space_dict is self._label_space_source:
            return
        space = LabelSpace.from_dict(space_dict)
        space.check_num_classes(self.bbox_head.num_classes, 'the training mixture')
        space.check_experts(self.num_experts)
        if space != self.label_space:
            self.label_space_bytes.copy_(label_space_to_buffer(space, self.label_space_bytes))
            self.label_space = space
            self._tables.clear()
        self._label_space_source = space_dict

    def trained_label_space(self, test_space: Optional[LabelSpace]) -> LabelSpace:
        """The label space the head's logits are in."""
        if self.label_space is not None:
            return self.label_space
        if self._loaded_without_label_space:
            raise RuntimeError(
                'the loaded checkpoint carries no label space (label_space_bytes), so its class '
                'ids cannot be matched to the test mixture\'s; re-save it from a damex training '
                'run, or train it with the mixture it is tested on')
        if test_space is None:
            raise RuntimeError('the model has no label space: train it on a DatasetMixture '
                               'or load a checkpoint of one')
        warnings.warn('DAMEXDINO: an untrained model (no trained label space) is evaluated; '
                      'its class ids are taken to be the test mixture\'s')
        return test_space

    def class_tables(self, metainfo: dict) -> Optional[Tuple[tuple, Optional[tuple]]]:
        """(trained ids to score, trained id -> test id or None) for an image, None when
        its dataset is not known (see :meth:`LabelSpace.prediction_tables`)."""
        name = metainfo.get('dataset_name')
        if name is None:
            return None
        space_dict = metainfo.get('label_space')
        key = (name, repr(space_dict))
        if key not in self._tables:
            if len(self._tables) > 256:
                self._tables.clear()
            test = None if space_dict is None else LabelSpace.from_dict(space_dict)
            trained = self.trained_label_space(test)
            trained.check_num_classes(self.bbox_head.num_classes, 'the model\'s label space')
            self._tables[key] = trained.prediction_tables(name, test)
        return self._tables[key]

    def prepare_prediction(self, batch_data_samples: SampleList) -> None:
        """Give each sample its trained ``expert_id`` and the head its class tables."""
        for sample in batch_data_samples:
            name = sample.metainfo.get('dataset_name')
            if self.label_space is not None and name in self.label_space.names:
                sample.set_metainfo(dict(expert_id=self.label_space.expert_of(name)))
            if isinstance(self.bbox_head, DatasetAwareDINOHead):
                tables = self.class_tables(sample.metainfo)
                if tables is not None:
                    sample.set_metainfo(dict(score_classes=tables[0], output_labels=tables[1]))

    @contextlib.contextmanager
    def naming_the_batch(self, batch_inputs: Tensor, batch_data_samples: SampleList):
        """Non-finite values: say which images, and whether the images themselves were."""
        paths = [s.metainfo.get('img_path') for s in batch_data_samples]
        if not torch.isfinite(batch_inputs).all():
            raise FloatingPointError(f'the input images {paths} hold non-finite pixels '
                                     '(nan/inf) after preprocessing; check those files')
        try:
            yield
        except FloatingPointError as error:
            raise FloatingPointError(f'{error} (batch images: {paths})') from error

    def loss(self, batch_inputs: Tensor, batch_data_samples: SampleList) -> dict:
        self.adopt_label_space(batch_data_samples)
        with self.naming_the_batch(batch_inputs, batch_data_samples):
            losses = super().loss(batch_inputs, batch_data_samples)
        losses.update(self.moe_losses())
        losses.update(self.routing_telemetry(batch_data_samples))
        return losses

    def routing_telemetry(self, batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """``routing/<layer>/<stat>`` and their mean over layers ``routing/<stat>``, from the
        layers' last forward (see :func:`~damex.evaluation.routing_stats.routing_telemetry`).

        They are logged with the losses (not summed into the loss: no 'loss' in their
        names), so mmengine averages them over each logger interval and writes them to the
        log line, ``scalars.json`` and any visualizer backend.
        """
        layers = self.moe_layers
        if not layers:
            return {}
        ids = [s.metainfo.get('dataset_id') for s in batch_data_samples]
        dataset_ids = None if any(i is None for i in ids) else torch.tensor(ids)
        out, collected = {}, {}
        for name, layer in layers.items():
            for key, value in routing_telemetry(layer.last_routing, dataset_ids).items():
                out[f'routing/{name}/{key}'] = value
                collected.setdefault(key, []).append(value)
        for key, values in collected.items():
            out[f'routing/{key}'] = torch.stack(values).mean()
        return out

    def predict(self, batch_inputs: Tensor, batch_data_samples: SampleList,
                rescale: bool = True) -> SampleList:
        """DINO's predict; each sample also gets ``routing_counts`` (L, E), the tokens of
        the image that reached each expert in each MoE layer (``routing_layers`` in its
        metainfo names the layers), for the routing analysis."""
        self.prepare_prediction(batch_data_samples)
        with self.naming_the_batch(batch_inputs, batch_data_samples):
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
