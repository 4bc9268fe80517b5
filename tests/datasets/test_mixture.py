"""The mixture: label spaces, expert maps, tagged samples; the tools."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

import damex  # noqa: F401
from damex.datasets import DatasetMixture, LabelSpace

from damex.testing import REPO, load_tool

PIPELINE = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(128, 128), keep_ratio=True), dict(type='PackDetInputs')]


def dota_cfg(sample_data, **kwargs):
    root = osp.join(sample_data, 'dota_sample')
    return dict(type='DOTADataset', ann_file=osp.join(root, 'labelTxt'),
                data_prefix=dict(img_path=osp.join(root, 'images')), pipeline=PIPELINE, **kwargs)


def trees_cfg(sample_data, **kwargs):
    return dict(type='XMLFolderDataset', ann_file=osp.join(sample_data, 'neon_trees'),
                metainfo=dict(classes=('Tree', )), pipeline=PIPELINE,
                class_aliases=dict(Alive='Tree', Dead='Tree'), **kwargs)


@pytest.fixture
def mixture(sample_data):
    return DatasetMixture(datasets=[dict(name='dota', dataset=dota_cfg(sample_data)),
                                    dict(name='trees', dataset=trees_cfg(sample_data))])


def test_sizes_offsets_and_default_experts(mixture):
    space = mixture.label_space
    assert mixture.dataset_sizes() == [4, 2] and len(mixture) == 6
    assert space.num_classes == 16 and space.classes[15] == 'Tree'
    assert [d.offset for d in space.datasets] == [0, 15]
    assert space.experts == (0, 1)
    meta = mixture.metainfo
    assert meta['dataset_names'] == ('dota', 'trees')
    assert LabelSpace.from_metainfo(meta).datasets[1].label_map == (15, )


def test_packed_samples_carry_dataset_expert_and_unified_labels(mixture):
    sample = mixture[4]['data_samples']  # first tree tile (after the 4 DOTA images)
    assert (sample.dataset_id, sample.dataset_name, sample.expert_id) == (1, 'trees', 1)
    assert set(sample.gt_instances.labels.tolist()) == {15}
    dota_sample = mixture[0]['data_samples']
    own = [i['bbox_label'] for i in mixture.datasets[0].get_data_info(0)['instances']]
    assert sorted(dota_sample.gt_instances.labels.tolist() +
                  dota_sample.ignored_instances.labels.tolist()) == sorted(own)
    assert dota_sample.label_map == list(range(15))
    assert 'instances' not in dota_sample  # only test-mode samples carry raw annotations


def test_test_mode_samples_carry_raw_annotations(sample_data):
    mixture = DatasetMixture(datasets=[dict(name='trees', dataset=trees_cfg(sample_data,
                                                                             test_mode=True))])
    sample = mixture[0]['data_samples']
    assert len(sample.instances) == len(mixture.datasets[0].get_data_info(0)['instances'])


def test_merged_and_explicit_label_spaces():
    datasets = [('a', ('car', 'person'), 0), ('b', ('person', 'dog'), 1), ('c', ('car', ), 1)]
    disjoint = LabelSpace.build(datasets)
    assert disjoint.num_classes == 5 and [d.label_map for d in disjoint.datasets] == [
        (0, 1), (2, 3), (4, )]
    merged = LabelSpace.build(datasets, merge=True)
    assert merged.classes == ('car', 'person', 'dog')
    assert [d.label_map for d in merged.datasets] == [(0, 1), (1, 2), (0, )]
    explicit = LabelSpace.build(datasets, merge={'b.person': 'human', 'a.person': 'human'})
    assert explicit.classes == ('car', 'human', 'dog', 'car')
    assert explicit.datasets[1].label_map == (1, 2)
    assert explicit.to_dataset(1, torch.tensor([1, 2, 0])).tolist() == [0, 1, -1]
    assert explicit.class_mask(1).tolist() == [False, True, True, False]


def test_expert_map_many_to_one_and_errors(sample_data):
    shared = DatasetMixture(num_experts=1, datasets=[
        dict(name='dota', dataset=dota_cfg(sample_data), expert=0),
        dict(name='trees', dataset=trees_cfg(sample_data), expert=0)])
    assert shared.label_space.experts == (0, 0)
    assert shared[5]['data_samples'].expert_id == 0
    with pytest.raises(ValueError, match=r"dataset 'trees' \(#1\) has no expert: the 1 experts"):
        DatasetMixture(num_experts=1, datasets=[dict(name='dota', dataset=dota_cfg(sample_data)),
                                                dict(name='trees', dataset=trees_cfg(sample_data))])
    with pytest.raises(ValueError, match=r"dataset 'trees' is mapped to expert 3, .* must be \[0, 2\)"):
        DatasetMixture(num_experts=2, datasets=[
            dict(name='dota', dataset=dota_cfg(sample_data)),
            dict(name='trees', dataset=trees_cfg(sample_data), expert=3)])
    with pytest.raises(ValueError, match="duplicate dataset name 'dota'"):
        DatasetMixture(datasets=[dict(name='dota', dataset=dota_cfg(sample_data)),
                                 dict(name='dota', dataset=dota_cfg(sample_data))])


def test_split_tool_keeps_every_object_fully_inside_a_patch(tmp_path, sample_data):
    split = load_tool('tools/dataset_converters/split_dota.py')
    root = osp.join(sample_data, 'dota_sample')
    ann_dir = tmp_path / 'ann'
    ann_dir.mkdir()
    (ann_dir / 'P0168.txt').write_text(open(osp.join(root, 'labelTxt', 'P0168.txt')).read())
    out = tmp_path / 'out'
    coco = split.split_dota(osp.join(root, 'images'), str(ann_dir), str(out),
                            patch_size=1024, overlap=200)
    objects = split.read_objects(str(ann_dir / 'P0168.txt'))
    xs = split.window_starts(2304, 1024, 824)
    ys = split.window_starts(1792, 1024, 824)
    assert xs == [0, 824, 1280] and ys == [0, 768]
    fully_inside = 0
    for y0 in ys:
        for x0 in xs:
            lines = (out / 'labelTxt' / f'P0168__1024__{x0}___{y0}.txt').read_text().splitlines()
            for coords, name, _ in objects:
                if (min(coords[0::2]) >= x0 and max(coords[0::2]) <= x0 + 1024
                        and min(coords[1::2]) >= y0 and max(coords[1::2]) <= y0 + 1024):
                    fully_inside += 1
                    shifted = ' '.join(f'{v - (x0 if i % 2 == 0 else y0):.1f}'
                                       for i, v in enumerate(coords))
                    assert f'{shifted} {name} 0' in lines
    assert fully_inside >= len(objects)  # every object lies fully inside some patch here
    assert len(coco['images']) == 6 and len(coco['annotations']) >= fully_inside
    # the patches load back as a DOTA dataset
    from damex.datasets import DOTADataset
    patches = DOTADataset(ann_file=str(out / 'labelTxt'), data_prefix=dict(
        img_path=str(out / 'images')), pipeline=[])
    assert sum(len(patches.get_data_info(i)['instances']) for i in range(6)) == len(
        coco['annotations'])


@pytest.mark.slow  # trains or spawns a process
def test_print_mixture_lists_datasets_and_checks_files(demo_data):
    result = subprocess.run([sys.executable, 'tools/misc/print_mixture.py',
                             'configs/demo/damex_demo.py'], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'aerial        DOTADataset' in result.stdout
    assert 'all files found' in result.stdout


def test_expert_none_with_a_plan_that_lacks_the_dataset_names_both(sample_data, tmp_path):
    plan = tmp_path / 'PLAN.json'
    plan.write_text('{"experts": {"dota": 1}}')
    # expert=None is how --cfg-options unsets an expert: the plan must then have the dataset
    with pytest.raises(ValueError, match=rf"dataset 'trees' is not in the expert plan "
                                         rf"{plan} \(it plans \['dota'\]\)"):
        DatasetMixture(num_experts=2, expert_plan=str(plan), datasets=[
            dict(name='dota', dataset=dota_cfg(sample_data)),
            dict(name='trees', dataset=trees_cfg(sample_data), expert=None)])
    planned = DatasetMixture(num_experts=2, expert_plan=str(plan), datasets=[
        dict(name='dota', dataset=dota_cfg(sample_data), expert=None),
        dict(name='trees', dataset=trees_cfg(sample_data), expert=0)])
    assert planned.label_space.experts == (1, 0)
