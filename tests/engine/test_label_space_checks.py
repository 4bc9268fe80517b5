"""Wrong sizes fail early and clearly (issue #11.5)."""
import copy
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.runner import Runner

from damex.testing import REPO, tiny_demo_config


@pytest.mark.slow  # trains or spawns a process
def test_too_few_classes_fail_before_the_first_iteration(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    cfg.model.bbox_head.num_classes = 4  # the demo mixture has 5 unified classes
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r'model.bbox_head.num_classes is 4, but the mixture has '
                                         r'5 unified classes'):
        runner.train()
    assert runner.iter == 0


@pytest.mark.slow  # trains or spawns a process
def test_too_few_classes_fail_in_the_model_without_the_hook(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    cfg.model.bbox_head.num_classes = 4
    cfg.custom_hooks = [h for h in cfg.custom_hooks if h.type != 'ExpertMapCheckHook']
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r'model.bbox_head.num_classes is 4, but the training '
                                         r'mixture has 5'):
        runner.train()


@pytest.mark.slow  # trains or spawns a process
def test_resume_with_another_number_of_experts_names_the_layer(demo_data, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    cfg.model.moe.num_experts = 4
    cfg.train_cfg.max_iters = 2
    cfg.resume = True
    cfg.load_from = str(tmp_path / 'iter_1.pth')
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=r'decoder\.layers\.0\.ffn: the checkpoint has 3 experts, '
                                         r'the model 4'):
        runner.train()
    assert not osp.exists(tmp_path / 'iter_2.pth')


@pytest.mark.slow  # trains or spawns a process
def test_print_mixture_fails_on_a_wrong_num_classes(demo_data, tmp_path):
    config = tmp_path / 'wrong.py'
    config.write_text(f"_base_ = '{REPO}/configs/demo/damex_demo.py'\n"
                      "model = dict(bbox_head=dict(num_classes=7))\n")
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools/misc/print_mixture.py'),
                             str(config)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'model.bbox_head.num_classes is 7, but the mixture has 5' in result.stdout
