"""bfloat16 training in a real fastai Learner (fastai.basics only): a digits classifier whose parameters are
bfloat16, trained with ranger keeping its state in bfloat16 (Kahan-compensated updates, the default), reaches the
accuracy of the same training in float32, every step fused."""
import pytest, torch
from torch import nn
from fastai.basics import Learner, CrossEntropyLossFlat, accuracy
import fastai.callback.schedule  # fit_one_cycle
import fastopt
from test_fastai_learner import digits_dls, mlp

class Cast(nn.Module):
    "Cast the input to `dtype`: first and last layer of the model, so that data, loss and metrics stay float32"
    def __init__(self, dtype): super().__init__(); self.dtype = dtype
    def forward(self, x): return x.to(self.dtype)

def ranger_bf16_state(params, lr, **kwargs):
    "ranger keeping its state in bfloat16 (a setting, set after construction), every step fused"
    opt = fastopt.ranger(params, lr, **kwargs)
    opt.state_dtype, opt.execution = torch.bfloat16, 'fused'
    return opt

def _train(dtype):
    model = mlp(64, 10)   # seeded: the same initial weights for both runs
    if dtype == torch.bfloat16: model = nn.Sequential(Cast(dtype), model.to(dtype), Cast(torch.float32))
    opt_func = ranger_bf16_state if dtype == torch.bfloat16 else fastopt.ranger
    torch.manual_seed(42)
    learn = Learner(digits_dls(bs=128), model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(5, 3e-2)
        return learn, learn.validate()[1]

def test_bf16_parameters_and_state_train_digits_as_well_as_fp32():
    learn32, acc32 = _train(torch.float32)
    learn16, acc16 = _train(torch.bfloat16)
    params = list(learn16.model.parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    for p in params:
        st = learn16.opt.state[p]
        assert st['grad_avg'].dtype == st['sqr_avg'].dtype == st['kahan_comp'].dtype == torch.bfloat16
        assert learn16.opt.slow_weights is not None
    assert learn16.opt.execution_counts['per_param'] == 0 and learn16.opt.execution_counts['fused'] > 0
    assert acc32 > 0.9
    assert abs(acc16 - acc32) <= 0.01, f'bfloat16: {acc16:.4f}, float32: {acc32:.4f}'
