"""Datasets (DOTA txt, VOC XML folders, UODB's VOC layout; COCO via mmdet), the mixture and its sampler."""
from .dota import DOTA_CLASSES, AnnotationError, DOTADataset
from .label_space import DatasetEntry, LabelSpace
from .mixture import DatasetMixture
from .samplers import MixtureSampler, dataset_probabilities
from .uodb_xml import UODBXMLDataset
from .xml_folder import XMLFolderDataset

__all__ = ['DOTADataset', 'DOTA_CLASSES', 'AnnotationError', 'XMLFolderDataset',
           'DatasetMixture', 'LabelSpace', 'DatasetEntry', 'MixtureSampler',
           'dataset_probabilities', 'UODBXMLDataset']
