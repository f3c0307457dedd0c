"""Exact resume. For every optimizer (and both execution strategies): N steps, a checkpoint of model, optimizer and
LR scheduler, then a *fresh process* restores it into new objects and trains M more steps. The weights must be
bit-identical to an uninterrupted N+M run. The same for a fastai Learner saved and loaded in the middle of
fit_one_cycle. The second halves run in tests/resume_worker.py."""
import subprocess, sys
from pathlib import Path
import pytest, torch
import resume_worker as W
from helpers import zoo

CONFIGS = [f'{name}:{execution}' for name in zoo() for execution in ('default', 'per_param') if
           not (name == 'OptimWrapper' and execution == 'per_param')]   # torch's AdamW has one strategy of its own
WORKER = Path(__file__).parent/'resume_worker.py'

def _worker(*args):
    res = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
    "Per config: the uninterrupted run's weights, and those of the run resumed in a fresh process"
    out = tmp_path_factory.mktemp('resume')
    uninterrupted = {}
    for config in CONFIGS:
        m, opt, sched = W.build(config)
        W.train(m, opt, sched, range(W.FIRST))
        torch.save(W.checkpoint(m, opt, sched), out/f'{config}.ckpt')
        W.train(m, opt, sched, range(W.FIRST, W.FIRST + W.REST))
        uninterrupted[config] = m.state_dict()
    _worker('optimizers', out, *CONFIGS)
    return {c: (uninterrupted[c], torch.load(out/f'{c}.resumed', weights_only=True)) for c in CONFIGS}

@pytest.mark.parametrize('config', CONFIGS)
def test_resume_in_a_fresh_process_is_bit_exact(resumed, config):
    expected, got = resumed[config]
    start = W.model().state_dict()
    assert any(not torch.equal(expected[k], start[k]) for k in start), 'the run must have trained'
    for k in expected: assert torch.equal(got[k], expected[k]), f'{config}: {k} differs after resuming'

def test_checkpoint_taken_mid_lookahead_cycle():
    m, opt, sched = W.build('ranger:default')
    W.train(m, opt, sched, range(W.FIRST))
    assert opt.state_dict()['count'] % opt.k != 0   # the resume tests above restart inside a cycle

class SaveAndStop:
    "Save the learner (with the optimizer's state) after epoch `SAVE_AFTER` - 1 and stop fitting"
    def __new__(cls):
        from fastai.basics import Callback, CancelFitException
        class _SaveAndStop(Callback):
            order = 100
            def after_epoch(self):
                if self.epoch == W.SAVE_AFTER - 1:
                    self.learn.save('ckpt', with_opt=True)
                    raise CancelFitException()
        return _SaveAndStop()

def test_fastai_learner_resumes_mid_fit_one_cycle_exactly(tmp_path):
    whole = W.learner(tmp_path); W.fit(whole)
    part = W.learner(tmp_path); W.fit(part, cbs=SaveAndStop())
    assert (tmp_path/'models'/'ckpt.pth').exists()
    assert not all(torch.equal(a, b) for a, b in zip(part.model.state_dict().values(), whole.model.state_dict().values()))
    _worker('learner', tmp_path)
    got = torch.load(tmp_path/'learner.resumed', weights_only=True)
    for k, v in whole.model.state_dict().items(): assert torch.equal(got[k], v), f'{k} differs after resuming'
