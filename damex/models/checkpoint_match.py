"""Does a checkpoint fit the model built from the config? Where it does not, say why.

mmengine loads checkpoints non-strictly: a missing or unexpected key, or a tensor of
another shape, is one warning in the log and leaves that part of the model at its random
initialisation. At test or inference time that gives metrics from a partly random model,
so damex makes it an error (fine-tuning with ``load_from`` stays non-strict).
"""
import re
from typing import Dict, List, Optional, Tuple

from torch import nn

# buffers that adapt themselves on load (the head re-encodes its label space)
SELF_ADAPTING = ('label_space_bytes', )
SHOWN = 5


class CheckpointMismatchError(ValueError):
    """The checkpoint's state dict does not match the model: numbers would be wrong."""


def _likely_settings(missing: List[str], unexpected: List[str],
                     reshaped: List[Tuple[str, tuple, tuple]]) -> List[str]:
    hints = []
    if any(re.search(r'\.ffn\.(experts|router|layers)\.', k) for k in missing + unexpected):
        hints.append('the MoE placement (model.moe.encoder_layers / model.moe.decoder_layers, '
                     'or model.moe absent in one of them)')
    for key, saved, own in reshaped:
        layer = re.match(r'(.*\.ffn)\.experts\.fc1_weight$', key)
        if layer and saved[0] != own[0]:
            hints.append(f'the number of experts (model.moe.num_experts): {layer.group(1)}: '
                         f'the checkpoint has {saved[0]} experts, the model {own[0]}')
            break
    else:
        if any(re.search(r'\.ffn\.(experts|router)\.', k) for k, _, _ in reshaped):
            hints.append('the number of experts (model.moe.num_experts) or the FFN width')
    if any(re.search(r'cls_branches|label_embedding', k) for k, _, _ in reshaped):
        hints.append('the number of classes (model.bbox_head.num_classes)')
    if not hints:
        hints.append('the model architecture (backbone, neck, number of layers or queries)')
    return hints


def describe_mismatch(model: nn.Module, state_dict: Dict) -> Optional[str]:
    """None when ``state_dict`` has exactly the model's keys and shapes, else a message
    listing the first missing, unexpected and reshaped keys and the setting likely to differ."""
    own = model.state_dict()
    loaded = {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}
    missing = [k for k in own if k not in loaded and 'num_batches_tracked' not in k]
    unexpected = [k for k in loaded if k not in own and 'num_batches_tracked' not in k]
    reshaped = [(k, tuple(loaded[k].shape), tuple(own[k].shape)) for k in own
                if k in loaded and hasattr(loaded[k], 'shape')
                and not k.endswith(SELF_ADAPTING) and loaded[k].shape != own[k].shape]
    if not (missing or unexpected or reshaped):
        return None

    def listed(what: str, keys: List[str]) -> str:
        more = f', ... ({len(keys)} in all)' if len(keys) > SHOWN else ''
        return f'{what}: {", ".join(keys[:SHOWN])}{more}'

    parts = [listed(what, keys) for what, keys in (
        ('missing from the checkpoint', missing), ('unexpected in the checkpoint', unexpected),
        ('shape in the checkpoint vs the model',
         [f'{k} {saved} vs {mine}' for k, saved, mine in reshaped])) if keys]
    return ('the checkpoint does not match the model built from the config; '
            + '; '.join(parts) + '. Likely different: '
            + ' or '.join(_likely_settings(missing, unexpected, reshaped))
            + '. Use the config the checkpoint was trained with (its copy is in the work dir); '
              'to fine-tune from another model, set load_from in a training config')
