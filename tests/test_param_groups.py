"""Parameter-group builders: every parameter in exactly one group, the right ones exempt from weight decay, the
same training as torch.optim given the same groups, and fastai's splitter + slice giving layer-wise decay."""
import warnings
import pytest, torch
from torch import nn
import fastopt
from fastopt.param_groups import *
from fastopt.modern import Lion
from helpers import gradient_stream

class Net(nn.Module):
    "Every kind of parameter the builders tell apart, and a tied (shared) weight"
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.ln = nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6)
        self.bn, self.gn, self.rms = nn.BatchNorm1d(6), nn.GroupNorm(2, 6), nn.RMSNorm(6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight   # tied: listed once
        self.scale = nn.Parameter(torch.ones(6))
    def blocks(self): return [self.emb, nn.ModuleList([self.lin, self.ln]), nn.ModuleList([self.bn, self.gn, self.rms]),
                              nn.ModuleList([self.conv]), [self.scale]]

def _names(model, ps):
    names = {id(p): n for n, p in model.named_parameters()}
    return sorted(names[id(p)] for p in ps)

def test_split_no_decay_exempts_biases_norms_and_embeddings():
    net = Net()
    decay, no_decay = split_no_decay(net)
    assert _names(net, decay) == ['conv.weight', 'lin.weight']
    assert _names(net, no_decay) == sorted(['emb.weight', 'lin.bias', 'ln.weight', 'ln.bias', 'bn.weight', 'bn.bias',
                                            'gn.weight', 'gn.bias', 'rms.weight', 'conv.bias', 'scale'])
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}

def test_no_decay_groups_train_as_torch_adamw_with_the_same_groups():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    ours = fastopt.Adam(no_decay_groups(a, wd=0.1), lr=1e-2, sqr_mom=0.999, eps=1e-8)
    ref = torch.optim.AdamW(no_decay_groups(b, wd=0.1, wd_key='weight_decay'), lr=1e-2, eps=1e-8)
    assert [g['wd'] for g in ours.param_groups] == [0.1, 0.]
    pa, pb = list(a.parameters()), list(b.parameters())
    for step in gradient_stream([pa], 50):
        for p, q, g in zip(pa, pb, step): p.grad, q.grad = g.clone(), g.clone()
        ours.step(); ref.step()
    for p, q in zip(pa, pb): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

def test_mark_no_decay_is_the_same_as_no_decay_groups():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    grouped = fastopt.Adam(no_decay_groups(a, wd=0.1), lr=1e-2)
    flagged = fastopt.Adam(b.parameters(), lr=1e-2, wd=0.1)
    assert mark_no_decay(flagged, b) == 11
    pa, pb = list(a.parameters()), list(b.parameters())
    for step in gradient_stream([pa], 20):
        for p, q, g in zip(pa, pb, step): p.grad, q.grad = g.clone(), g.clone()
        grouped.step(); flagged.step()
    for p, q in zip(pa, pb): assert torch.equal(p, q)

def test_layerwise_groups_decay_the_learning_rate_towards_the_input():
    net = Net()
    groups = layerwise_groups(net.blocks(), lr=1e-3, lr_decay=0.5)
    assert [g['lr'] for g in groups] == pytest.approx([1e-3 * 0.5**k for k in (4, 3, 2, 1, 0)])
    groups = layerwise_groups(net.blocks()[:4], lr=1e-3, lr_decay=0.8, wd=0.05)
    assert [g['lr'] for g in groups] == pytest.approx([1e-3*0.8**3, 1e-3*0.8**2, 1e-3*0.8**2, 1e-3*0.8, 1e-3, 1e-3])
    assert [g['wd'] for g in groups] == [0., 0.05, 0., 0., 0.05, 0.]   # embedding; linear; norms; convolution
    opt = Lion(groups, lr=1.)   # a group's own values win over the optimizer's
    assert [g['lr'] for g in opt.param_groups] == [g['lr'] for g in groups]

def test_fastai_splitter_and_slice_give_layerwise_rates():
    from fastai.basics import Learner, DataLoaders
    net = Net()
    dls = DataLoaders.from_dsets([(torch.zeros(6), torch.zeros(1))], [(torch.zeros(6), torch.zeros(1))], bs=1, device='cpu')
    learn = Learner(dls, net, loss_func=nn.MSELoss(), opt_func=fastopt.Adam, splitter=layers_splitter(Net.blocks),
                    lr=lr_decay_slice(1e-3, 0.5, 5))
    learn.create_opt()
    expected = [g['lr'] for g in layerwise_groups(net.blocks(), lr=1e-3, lr_decay=0.5)]
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx(expected, rel=1e-12)

def test_bad_arguments():
    net = Net()
    with pytest.raises(ValueError, match="lr_decay must be in"): layerwise_groups(net.blocks(), lr=1e-3, lr_decay=1.5)
    with pytest.raises(ValueError, match="lr_decay must be in"): lr_decay_slice(1e-3, 0., 3)
    with pytest.raises(ValueError, match="shares parameters"): layerwise_groups([net.lin, net.lin], lr=1e-3, lr_decay=0.5)
    with pytest.raises(TypeError, match="needs modules"): layerwise_groups([[net.scale]], lr=1e-3, lr_decay=0.5, wd=0.1)
