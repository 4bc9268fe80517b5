"""Crash-safe checkpoints: a kill at any instant loses at most the checkpoint being written.

mmengine's ``CheckpointHook`` deletes the oldest kept checkpoint before it writes the new
one, writes the new file in place and then rewrites ``last_checkpoint``: a SIGKILL inside
that window leaves a truncated file (or none) and a ``last_checkpoint`` naming a deleted
file. :class:`CrashSafeCheckpointHook` keeps mmengine's arguments and behaviour but orders
every write the way Orbax does: the new file is written under a temporary name, flushed,
fsynced and renamed into place (``os.replace``); ``last_checkpoint`` is then replaced the
same way; only after that are checkpoints beyond ``max_keep_ckpts`` (or the previous best)
removed. On resume it checks what ``last_checkpoint`` names and falls back to the newest
complete checkpoint in the work dir.
"""
import glob
import os
import os.path as osp
import re
from typing import List, Optional, Tuple

import torch
from mmengine.dist import barrier, is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict

from mmdet.registry import HOOKS
from .log_lines import held_log_lines

PARTIAL_SUFFIX = '.partial'


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(partial: str, final: str) -> None:
    """Make the complete file ``partial`` visible as ``final`` in one step (same folder)."""
    with open(partial, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(partial, final)
    _fsync_dir(osp.dirname(osp.abspath(final)))


def write_text_atomically(path: str, text: str) -> None:
    partial = path + PARTIAL_SUFFIX
    with open(partial, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    _fsync_dir(osp.dirname(osp.abspath(path)))


def why_unloadable(path: str) -> Optional[str]:
    """None when ``path`` loads as an mmengine checkpoint, else the reason it does not."""
    if not osp.isfile(path):
        return 'the file does not exist'
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # a truncated or corrupt file raises many kinds of errors
        return f'it does not load ({type(error).__name__}: {str(error).splitlines()[0][:120]})'
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint or 'meta' not in checkpoint:
        return 'it is not an mmengine checkpoint (no state_dict / meta)'
    return None


def numbered_checkpoints(folder: str, filename_tmpl: str) -> List[Tuple[int, str]]:
    """The checkpoints of ``filename_tmpl`` (e.g. ``iter_{}.pth``) in ``folder``, newest first."""
    pattern = re.compile(re.escape(filename_tmpl).replace(r'\{\}', r'(\d+)') + '$')
    found = []
    for path in glob.glob(osp.join(glob.escape(folder), '*')):
        match = pattern.match(osp.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


@HOOKS.register_module()
class CrashSafeCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (same arguments) with atomic writes and safe resume.

    - Every checkpoint (interval, ``save_last``, ``save_best``) appears under its final
      name only when complete; ``last_checkpoint`` is replaced after it; old checkpoints
      are removed last. Only rank 0 writes. Temporary ``*.partial`` files of a killed
      write are removed when training starts again.
    - Resume (``--resume`` / ``resume=True`` without ``load_from``): when
      ``last_checkpoint`` is missing, names a missing file or a file that does not load,
      or a newer complete checkpoint exists, training resumes from the newest complete
      checkpoint, with one warning naming what was skipped and why; with none, an error.
    - Loading a checkpoint whose state dict does not match the model is an error, except
      for fine-tuning (``load_from`` in training without resume), which stays non-strict
      as in mmengine (see ``damex.models.checkpoint_match``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fine_tuning = False

    # ---- paths -------------------------------------------------------------------------
    def _checkpoint_dir(self, runner) -> str:
        """Where checkpoints go: ``out_dir`` resolved as mmengine does, else the work dir."""
        if self.out_dir is None or self.out_dir == runner.work_dir:
            return runner.work_dir
        if getattr(self, 'file_backend', None) is not None:  # resolved by before_train
            return self.out_dir
        return osp.join(self.out_dir, osp.basename(runner.work_dir.rstrip(osp.sep)))

    # ---- resume and strict loading -----------------------------------------------------
    def before_run(self, runner) -> None:
        cfg = runner.cfg
        training = isinstance(runner.optim_wrapper, (OptimWrapper, OptimWrapperDict))
        resume, load_from = cfg.get('resume', False), cfg.get('load_from')
        self._fine_tuning = training and bool(load_from) and not resume
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if hasattr(model, 'allow_partial_checkpoint'):
            model.allow_partial_checkpoint = self._fine_tuning
        if training and resume and not load_from:
            self._choose_resume_checkpoint(runner)

    def _choose_resume_checkpoint(self, runner) -> None:
        """Point ``last_checkpoint`` at the newest complete checkpoint (rank 0 writes)."""
        pointer = osp.join(runner.work_dir, 'last_checkpoint')
        named = None
        if osp.isfile(pointer):
            with open(pointer) as f:
                named = f.read().strip() or None
        folder = self._checkpoint_dir(runner)
        candidates = [path for _, path in numbered_checkpoints(folder, self.filename_tmpl)]
        if named is not None and osp.abspath(named) not in map(osp.abspath, candidates):
            candidates.insert(0, named)  # a file outside the numbered series: it was asked for
        skipped, chosen = [], None
        for path in candidates:
            reason = why_unloadable(path)
            if reason is None:
                chosen = path
                break
            skipped.append(f'{osp.basename(path)} ({reason})')
        if named is None:
            skipped.insert(0, f'last_checkpoint ({"empty" if osp.isfile(pointer) else "missing"})')
        if chosen is None:
            raise FileNotFoundError(
                f'resume (--resume / resume=True): no complete checkpoint to resume from in '
                f'{folder} (checked: {"; ".join(skipped) or "no checkpoint files"}). Without '
                f'--resume training would start from scratch; pass --resume only when '
                f'{runner.work_dir} holds the run to continue, or set load_from to a checkpoint')
        if named is None or osp.abspath(named) != osp.abspath(chosen) or skipped:
            why = f'skipped {"; ".join(skipped)}' if skipped else f'newer than {named}'
            runner.logger.warning(f'resume: resuming from {chosen} ({why})')
            if is_main_process():
                write_text_atomically(pointer, chosen)
        barrier()  # every rank takes the same decision; the others read the pointer after

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._fine_tuning:
            return
        from ..models.checkpoint_match import CheckpointMismatchError, describe_mismatch
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        problem = describe_mismatch(model, checkpoint.get('state_dict', checkpoint))
        if problem:
            source = runner.cfg.get('load_from') or 'the checkpoint being resumed'
            raise CheckpointMismatchError(f'{source}: {problem}')

    # ---- writing -----------------------------------------------------------------------
    def before_train(self, runner) -> None:
        # mmengine builds a FileClient it keeps only for compatibility: its two deprecation
        # warnings say nothing about this run
        with held_log_lines(r'^"FileClient" will be deprecated',
                            r'^"HardDiskBackend" is the alias of "LocalBackend"'):
            super().before_train(runner)
        if not isinstance(self.file_backend, LocalBackend):
            raise ValueError(
                f'CrashSafeCheckpointHook writes checkpoints atomically to a local or mounted '
                f'folder, but out_dir={self.out_dir} uses {type(self.file_backend).__name__}; '
                f'use mmengine\'s CheckpointHook for object stores')
        if is_main_process():
            for folder in {self.out_dir, runner.work_dir}:
                for partial in glob.glob(osp.join(glob.escape(folder), '*' + PARTIAL_SUFFIX)):
                    os.remove(partial)
                    runner.logger.info(f'removed {partial}, left by a write that was killed')
            # a kill between committing a checkpoint and removing the outdated ones leaves
            # those behind: remove what max_keep_ckpts would have removed
            if self.max_keep_ckpts > 0 and self.keep_ckpt_ids:
                for step, path in numbered_checkpoints(self.out_dir, self.filename_tmpl):
                    if step < min(self.keep_ckpt_ids):
                        os.remove(path)
                        runner.logger.info(f'removed {path}, outdated (max_keep_ckpts='
                                           f'{self.max_keep_ckpts}) before a kill')

    def _write(self, runner, filename: str, **kwargs) -> str:
        """Save a checkpoint as ``filename`` in out_dir atomically; returns its path."""
        final = osp.join(self.out_dir, filename)
        runner.save_checkpoint(self.out_dir, filename + PARTIAL_SUFFIX, self.file_client_args,
                               backend_args=self.backend_args, **kwargs)  # rank 0 only
        if is_main_process():
            commit_file(final + PARTIAL_SUFFIX, final)
        return final

    @staticmethod
    def _remove(path: Optional[str]) -> bool:
        if path and osp.isfile(path) and is_main_process():
            os.remove(path)
            return True
        return False

    def _save_checkpoint_with_step(self, runner, step, meta):
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = osp.join(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        self._write(runner, filename, save_optimizer=self.save_optimizer,
                    save_param_scheduler=self.save_param_scheduler, meta=meta,
                    by_epoch=self.by_epoch, **self.args)
        if is_main_process():
            write_text_atomically(osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
            if outdated is not None and outdated != step:
                self._remove(osp.join(self.out_dir, self.filename_tmpl.format(outdated)))

    def _save_best_checkpoint(self, runner, metrics) -> None:
        """mmengine's best-checkpoint logic; the new best is written before the old is removed."""
        if not self.save_best:
            return
        step = runner.epoch if self.by_epoch else runner.iter
        ckpt_filename = self.filename_tmpl.format(step)
        meta = dict(epoch=runner.epoch, iter=runner.iter)
        if 'auto' in self.key_indicators:
            self._init_rule(self.rules, [list(metrics.keys())[0]])
        single = len(self.key_indicators) == 1
        updated = False
        for key_indicator, rule in zip(self.key_indicators, self.rules):
            score_key = 'best_score' if single else f'best_score_{key_indicator}'
            path_key = 'best_ckpt' if single else f'best_ckpt_{key_indicator}'
            previous = self.best_ckpt_path if single else self.best_ckpt_path_dict[key_indicator]
            best_score = runner.message_hub.runtime_info.get(score_key, self.init_value_map[rule])
            score = metrics[key_indicator]
            if score is None or not self.is_better_than[key_indicator](score, best_score):
                continue
            updated = True
            runner.message_hub.update_info(score_key, score)
            best_name = f'best_{key_indicator}_{ckpt_filename}'.replace('/', '_')
            best_path = osp.join(self.out_dir, best_name)
            if single:
                self.best_ckpt_path = best_path
            else:
                self.best_ckpt_path_dict[key_indicator] = best_path
            runner.message_hub.update_info(path_key, best_path)
            self._write(runner, best_name, save_optimizer=False, save_param_scheduler=False,
                        meta=meta, by_epoch=False)
            if previous and osp.abspath(previous) != osp.abspath(best_path) and self._remove(previous):
                runner.logger.info(f'The previous best checkpoint {previous} is removed')
            runner.logger.info(f'The best checkpoint with {score:0.4f} {key_indicator} at '
                               f'{step} {"epoch" if self.by_epoch else "iter"} is saved to '
                               f'{best_name}.')
        # as mmengine: save the latest checkpoint again so that it records the new best
        if updated and self.last_ckpt is not None:
            self._save_checkpoint_with_step(runner, step, meta)
