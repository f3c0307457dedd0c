"""Bad input fails at once with a ValueError/TypeError whose message names the problem, and leaves the
optimizer (and the model's weights) exactly as they were."""
import copy, pytest, torch
from torch import nn
import fastopt
from fastopt import Optimizer, SGD, Adam, RAdam, Lamb, sgd_step

def snapshot(opt):
    "Everything an optimizer call could change: hypers, parameter identities and values, state"
    return dict(groups=[{k: (list(map(id, v)) if k == 'params' else v) for k, v in g.items()} for g in opt.param_groups],
                weights=[p.detach().clone() for g in opt.param_groups for p in g['params']],
                state={id(p): copy.deepcopy(s) for p, s in opt.state.items()})

def assert_unchanged(opt, before):
    after = snapshot(opt)
    assert after['groups'] == before['groups']
    for a, b in zip(after['weights'], before['weights']): assert torch.equal(a, b)
    assert after['state'].keys() == before['state'].keys()
    for k in before['state']:
        for name, v in before['state'][k].items():
            w = after['state'][k][name]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v

@pytest.fixture
def trained():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = Adam([list(model[0].parameters()), list(model[2].parameters())], lr=slice(1e-3, 1e-2))
    model(torch.randn(8, 4)).sum().backward(); opt.step()
    return model, opt

# ---- construction ----

@pytest.mark.parametrize('params,err,msg', [
    ([], ValueError, 'empty parameter list'),
    (iter([]), ValueError, 'empty parameter list'),
    ('weights', TypeError, 'params must be an iterable'),
    (3.0, TypeError, 'params must be an iterable'),
    ([torch.ones(2), 1.0], TypeError, 'parameter 1 of group 0 is a float, not a Tensor'),
    ([[torch.ones(2)], [None]], TypeError, 'parameter 0 of group 1 is a NoneType'),
    ([{'params': [torch.ones(2)]}, torch.ones(2)], TypeError, 'mixes group dicts'),
    ([{'lr': 0.1}], ValueError, "no 'params'"),
    ([{'params': {torch.ones(2)}}], TypeError, 'not a set'),
])
def test_bad_params(params, err, msg):
    with pytest.raises(err, match=msg): SGD(params, lr=0.1)

def test_tensor_listed_twice():
    w = torch.ones(2)
    with pytest.raises(ValueError, match='parameter 1 of group 0 is already parameter 0 of group 0'): SGD([w, w], lr=0.1)
    with pytest.raises(ValueError, match='parameter 0 of group 1 is already parameter 0 of group 0'): SGD([[w], [w]], lr=0.1)

def test_non_leaf_parameter():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match='not a leaf tensor'): SGD([w*2], lr=0.1)

@pytest.mark.parametrize('factory,kwargs,msg', [
    (SGD, dict(lr=-0.1), "invalid 'lr'"),
    (SGD, dict(lr=float('nan')), "invalid 'lr'"),
    (SGD, dict(lr=float('inf')), "invalid 'lr'"),
    (SGD, dict(lr=0.1, mom=1.0), "invalid 'mom'"),
    (SGD, dict(lr=0.1, mom=-0.5), "invalid 'mom'"),
    (SGD, dict(lr=0.1, wd=-1e-2), "invalid 'wd'"),
    (Adam, dict(lr=1e-3, eps=-1e-8), "invalid 'eps'"),
    (Adam, dict(lr=1e-3, eps=float('nan')), "invalid 'eps'"),
    (Adam, dict(lr=1e-3, sqr_mom=1.0), "invalid 'sqr_mom'"),
    (RAdam, dict(lr=[1e-3, -1e-3]), "invalid 'lr'"),
    (Lamb, dict(lr='0.1'), "'lr' must be a real number"),
])
def test_bad_hyper_at_construction(factory, kwargs, msg):
    groups = [[torch.ones(2)], [torch.ones(3)]]
    with pytest.raises((ValueError, TypeError), match=msg): factory(groups, **kwargs)

def test_wrong_length_hyper_list_at_construction():
    with pytest.raises(ValueError, match="'lr': got 3 values for 2 parameter groups"):
        SGD([[torch.ones(1)], [torch.ones(1)]], lr=[0.1, 0.2, 0.3])

def test_non_callable_callback():
    with pytest.raises(TypeError, match='callback 1 is a str'): Optimizer([torch.ones(1)], [sgd_step, 'adam'], lr=0.1)

# ---- after construction: errors change nothing ----

@pytest.mark.parametrize('call,err,msg', [
    (lambda o: o.set_hyper('lr', [1e-3, 1e-2, 1e-1]), ValueError, "'lr': got 3 values for 2"),
    (lambda o: o.set_hyper('lrr', 1e-3), ValueError, "unknown hyper-parameter 'lrr'"),
    (lambda o: o.set_hyper('params', []), ValueError, "unknown hyper-parameter 'params'"),
    (lambda o: o.set_hyper('lr', -1.), ValueError, "invalid 'lr'"),
    (lambda o: o.set_hyper('lr', [0.1, float('nan')]), ValueError, "invalid 'lr'"),
    (lambda o: o.set_hypers(mom=0.5, sqr_mom=1.5), ValueError, "invalid 'sqr_mom'"),
    (lambda o: o.set_hypers(lr=0.5, wd=[1, 2, 3]), ValueError, "'wd': got 3 values"),
    (lambda o: o.hypers[0].__setitem__('eps', -1), ValueError, "invalid 'eps'"),
    (lambda o: setattr(o, 'hypers', [{'lr': 1.}]), ValueError, 'for 1 groups'),
    (lambda o: setattr(o, 'param_lists', [[torch.ones(1)]]), ValueError, '1 parameter lists'),
    (lambda o: setattr(o, 'param_lists', [[torch.ones(1)], ['x']]), TypeError, 'parameter 0 of group 1 is a str'),
    (lambda o: setattr(o, 'param_groups', [{'params': [torch.ones(1)], 'lr': -1.}]), ValueError, "invalid 'lr'"),
    (lambda o: o.add_param_group({'params': o.param_lists[0][:1]}), ValueError, 'already parameter 0 of group 0'),
    (lambda o: o.add_param_group([torch.ones(1)]), TypeError, "a dict with a 'params' key"),
    (lambda o: o.freeze_to(1.5), TypeError, 'group index'),
    (lambda o: o.set_hyper('wd', float('nan')), ValueError, "invalid 'wd'"),
    (lambda o: o.set_hyper('eps', slice(-1e-8, 1e-8)), ValueError, "invalid 'eps'"),
    (lambda o: o.set_hyper('lr', float('inf')), ValueError, "invalid 'lr'"),
    (lambda o: o.set_hyper('mom', -0.1), ValueError, "invalid 'mom'"),
    (lambda o: o.param_groups[1].__setitem__('betas', (0.9, 1.0)), ValueError, "invalid 'sqr_mom'"),
    (lambda o: o.param_groups[0].__setitem__('momentum', 1.2), ValueError, "invalid 'mom'"),
    (lambda o: o.param_groups[0].__setitem__('lr', float('nan')), ValueError, "invalid 'lr'"),
    (lambda o: setattr(o, 'nonfinite_grads', 'ignore'), ValueError, 'nonfinite_grads must be one of'),
    (lambda o: setattr(o, 'execution', 'cuda'), ValueError, 'execution must be one of'),
])
def test_errors_leave_optimizer_unchanged(trained, call, err, msg):
    _, opt = trained
    before = snapshot(opt)
    with pytest.raises(err, match=msg): call(opt)
    assert_unchanged(opt, before)

def test_freeze_with_one_group():
    opt = SGD([torch.ones(2)], lr=0.1)
    with pytest.raises(ValueError, match='at least two groups'): opt.freeze()

def test_freeze_beyond_groups_warns(trained):
    _, opt = trained
    with pytest.warns(UserWarning, match='whole model is frozen'): opt.freeze_to(5)

# ---- load_state_dict ----

def _state_dict_of(factory, groups_shapes, **kw):
    groups = [[torch.randn(s) for s in shapes] for shapes in groups_shapes]
    opt = factory(groups, **kw)
    for g in groups:
        for p in g: p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()

def _optimizer_like_trained():
    return Adam([[torch.zeros(3, 4), torch.zeros(3)], [torch.zeros(2, 3), torch.zeros(2)]], lr=0.1)

def _torch_adam_state_dict():
    "Another library's optimizer over parameters of the same shapes"
    ps = [torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2)]
    opt = torch.optim.Adam([{'params': ps[:2]}, {'params': ps[2:]}])
    for p in ps: p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()

@pytest.mark.parametrize('make_sd,err,msg', [
    (lambda: _state_dict_of(SGD, [[(3, 4), (3,)], [(2, 3), (2,)]], lr=0.1, mom=0.9), ValueError, 'callbacks'),
    (lambda: _state_dict_of(Adam, [[(3, 4), (3,), (2, 3), (2,)]], lr=0.1), ValueError, '1 parameter groups'),
    (lambda: _state_dict_of(Adam, [[(3, 4)], [(2, 3), (2,)]], lr=0.1), ValueError, 'group 0: state dict has 1 parameters'),
    (lambda: _state_dict_of(Adam, [[(4, 3), (3,)], [(2, 3), (2,)]], lr=0.1), ValueError, r'has shape \(4, 3\)'),
    (lambda: {'state': {}}, ValueError, "missing \\['param_groups'\\]"),
    (lambda: fastopt.Lookahead(_optimizer_like_trained()).state_dict(), ValueError, 'saved by a Lookahead'),
    (lambda: _torch_adam_state_dict(), ValueError, r"lacks hyper-parameters \['wd'\]"),
    (lambda: [1, 2], TypeError, 'expected a state dict'),
])
def test_load_state_dict_mismatch_changes_nothing(trained, make_sd, err, msg):
    _, opt = trained
    before = snapshot(opt)
    with pytest.raises(err, match=msg): opt.load_state_dict(make_sd())
    assert_unchanged(opt, before)

def test_load_state_dict_casts_floating_state_to_the_storage_dtype(trained):
    "As torch does: state saved in another floating dtype is cast to the dtype this optimizer keeps it in"
    model, opt = trained
    sd = opt.state_dict()
    sd['state'][0]['grad_avg'] = sd['state'][0]['grad_avg'].double()
    opt.load_state_dict(sd)
    p = opt.param_groups[0]['params'][0]
    assert opt.state[p]['grad_avg'].dtype == p.dtype
    assert torch.equal(opt.state[p]['grad_avg'], sd['state'][0]['grad_avg'].to(p.dtype))

def test_load_state_dict_missing_hyper(trained):
    _, opt = trained
    sd = opt.state_dict()
    del sd['param_groups'][1]['eps']
    with pytest.raises(ValueError, match=r"group 1: state dict lacks hyper-parameters \['eps'\]"): opt.load_state_dict(sd)

def test_load_state_dict_does_not_mutate_or_alias_its_input(trained):
    _, opt = trained
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    fresh = Adam([[torch.zeros_like(p) for p in g] for g in opt.param_lists], lr=0.5)
    fresh.load_state_dict(sd)
    assert sd.keys() == frozen.keys() and sd['param_groups'] == frozen['param_groups']
    for i, s in frozen['state'].items():
        for k, v in s.items():
            assert torch.equal(sd['state'][i][k], v) if isinstance(v, torch.Tensor) else sd['state'][i][k] == v
    p0 = fresh.param_lists[0][0]
    fresh.state[p0]['grad_avg'].add_(1.)   # the loaded state is a copy: the source dict is untouched
    assert torch.equal(sd['state'][0]['grad_avg'], frozen['state'][0]['grad_avg'])
