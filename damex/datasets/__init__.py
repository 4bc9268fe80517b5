"""Datasets (DOTA txt, VOC XML folders; COCO via mmdet), the mixture and its sampler."""
from .dota import DOTA_CLASSES, AnnotationError, DOTADataset
from .label_space import DatasetEntry, LabelSpace
from .mixture import DatasetMixture
from .samplers import MixtureSampler, dataset_probabilities
from .xml_folder import XMLFolderDataset

__all__ = ['DOTADataset', 'DOTA_CLASSES', 'AnnotationError', 'XMLFolderDataset',
           'DatasetMixture', 'LabelSpace', 'DatasetEntry', 'MixtureSampler',
           'dataset_probabilities']
