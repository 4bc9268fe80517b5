"""The label space and its expert map: checks, checkpoint buffer, prediction tables, and
expert plans read and validated once."""
import json

import pytest
import torch

from damex.datasets.label_space import (ExpertPlan, LabelSpace, check_expert,
                                        label_space_from_buffer, label_space_to_buffer)

SPACE = LabelSpace.build([('trees', ('Tree', ), 0), ('aerial', ('plane', 'ship'), 1),
                          ('signs', ('stop', 'yield'), 1)])


def test_expert_checks_name_the_dataset_and_the_model_setting():
    SPACE.check_experts(2)
    with pytest.raises(ValueError, match=r"dataset 'aerial' is mapped to expert 1, but the model "
                                         r"has 1 experts \(model.moe.num_experts\)"):
        SPACE.check_experts(1)
    with pytest.raises(ValueError, match=r"dataset 'x': expert -1 must be a non-negative int"):
        check_expert(-1, None, 'x')
    with pytest.raises(ValueError, match=r'num_classes=5'):
        SPACE.check_num_classes(4, 'the mixture')


def test_buffer_round_trip_and_capacity():
    buffer = label_space_to_buffer(SPACE, torch.zeros(4096, dtype=torch.uint8))
    assert label_space_from_buffer(buffer) == SPACE
    assert label_space_from_buffer(torch.zeros(8, dtype=torch.uint8)) is None
    with pytest.raises(ValueError, match='LABEL_SPACE_CAPACITY'):
        label_space_to_buffer(SPACE, torch.zeros(16, dtype=torch.uint8))


def test_prediction_tables_in_a_reordered_subset_mixture():
    test = LabelSpace.build([('signs', ('yield', ), 0), ('trees', ('Tree', ), 1)])
    keep, table = SPACE.prediction_tables('signs', test)
    assert keep == (4, )  # 'yield' of signs in the trained space
    assert table == (1, -1, -1, -1, 0)  # trained id -> test id: Tree -> 1, yield -> 0
    assert SPACE.prediction_tables('aerial', None) == ((1, 2), None)
    with pytest.raises(KeyError, match=r"dataset 'lights' was not in the model's training"):
        SPACE.prediction_tables('lights', None)
    with pytest.raises(KeyError, match=r"class 'cone' of dataset 'signs'"):
        SPACE.prediction_tables('signs', LabelSpace.build([('signs', ('cone', ), 0)]))


def write_plan(path, experts, layers=None):
    path.write_text(json.dumps(dict(experts=experts, layers=layers or {})))
    return str(path)


def test_a_plan_is_read_once_and_again_when_it_changes(tmp_path, monkeypatch):
    path = write_plan(tmp_path / 'PLAN.json', dict(trees=1, aerial=0),
                      {'decoder.layers.0.ffn': dict(dataset_means=dict(trees=[0.0]))})
    parsed = []
    parse = ExpertPlan._parse.__func__
    monkeypatch.setattr(ExpertPlan, '_parse',
                        classmethod(lambda cls, p: parsed.append(p) or parse(cls, p)))
    first = ExpertPlan.read(path)
    assert ExpertPlan.read(path) is first and len(parsed) == 1
    assert first.experts == dict(trees=1, aerial=0)
    assert first.layer('decoder.layers.0.ffn')['dataset_means'] == dict(trees=[0.0])
    with pytest.raises(KeyError, match=r"no entry for layer 'decoder.layers.2.ffn'"):
        first.layer('decoder.layers.2.ffn')
    import os
    write_plan(tmp_path / 'PLAN.json', dict(trees=0))
    os.utime(path, ns=(1, 1))  # a new modification time
    assert ExpertPlan.read(path).experts == dict(trees=0) and len(parsed) == 2


@pytest.mark.parametrize('content, message', [
    ('{not json', 'cannot read it'),
    ('{"layers": {}}', 'no "experts" object'),
    ('{"experts": {"trees": "zero"}}', r"dataset 'trees' in the expert plan .*PLAN.json: expert "
                                       r"'zero' must be a non-negative int"),
    ('{"experts": {"trees": 0}, "layers": {"decoder.layers.0.ffn": {}}}', 'dataset_means'),
])
def test_a_bad_plan_is_an_error_naming_the_file(tmp_path, content, message):
    (tmp_path / 'PLAN.json').write_text(content)
    with pytest.raises(ValueError, match=message):
        ExpertPlan.read(str(tmp_path / 'PLAN.json'))
    with pytest.raises(ValueError, match='cannot read it'):
        ExpertPlan.read(str(tmp_path / 'missing.json'))
