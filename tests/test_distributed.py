"""fastopt under torch.distributed: 2 processes, gloo on loopback, a small model and a dozen steps. DDP (both
execution strategies), ZeRO, FSDP2 (DTensor parameters) and sharded Lookahead checkpoints, each compared with a
single-process run on the full batches. The jobs run in tests/dist_worker.py."""
import os, subprocess, sys
from pathlib import Path
import pytest, torch
import dist_worker as W

WORLD = 2
DDP = [f'ddp:{name}:{execution}' for name in ('ranger', 'Adam', 'Lamb', 'SGD') for execution in ('auto', 'per_param')]
ZERO = ['zero:Adam', 'zero:RAdam']
FSDP = [f'fsdp:{name}' for name in ('Adam', 'RAdam', 'SGD', 'Lamb', 'Larc', 'ranger')] + \
       [f'fsdp:{name}:{ex}' for name in ('Adam', 'Lamb') for ex in ('foreach', 'per_param')]
SCENARIOS = DDP + ZERO + FSDP + ['fsdp_strict', 'fsdp_checkpoint']

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    "Run every scenario in one pair of processes; per scenario, what each rank found"
    out = tmp_path_factory.mktemp('dist')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'GLOO_SOCKET_IFNAME': 'lo'}   # two processes share two cores
    cmd = [sys.executable, str(Path(__file__).parent/'dist_worker.py')]
    procs = [subprocess.Popen(cmd + [str(r), str(WORLD), str(out/'rendezvous'), str(out), *SCENARIOS], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()
    for p, log in zip(procs, logs): assert p.returncode == 0, log[-4000:]
    res = {}
    for s in SCENARIOS:
        ranks = [torch.load(out/f'{s}.rank{r}.pt', weights_only=False) for r in range(WORLD)]
        for r in ranks: assert 'error' not in r, f'{s}: {r.get("error")}'
        res[s] = ranks
    return res

def assert_close(got, expected, what):
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=lambda m: f'{what}, {k}: {m}')

def assert_equal(a, b, what):
    for k, v in b.items(): assert torch.equal(a[k], v), f'{what}: {k} differs'

def assert_ranks_agree_with_one_process(ranks, scenario, name):
    "Every rank holds the same weights, equal (1e-6) to the single-process run of `name` on full batches"
    assert_equal(ranks[0]['weights'], ranks[1]['weights'], 'rank 0 vs rank 1')
    assert_close(ranks[0]['weights'], W.reference(name), f'{scenario} vs one process')

@pytest.mark.parametrize('scenario', DDP)
def test_ddp_matches_single_process_on_full_batches(results, scenario):
    _, name, execution = scenario.split(':')
    r0, r1 = results[scenario]
    assert_ranks_agree_with_one_process((r0, r1), scenario, name)
    strategy = 'per_param' if execution == 'per_param' else 'fused'
    assert r0['counts'][strategy] == 4 * W.STEPS and sum(r0['counts'].values()) == 4 * W.STEPS

@pytest.mark.parametrize('scenario', ZERO)
def test_zero_shards_state_and_matches_unsharded_run(results, scenario):
    name = scenario.split(':')[1]
    r0, r1 = results[scenario]
    assert_ranks_agree_with_one_process((r0, r1), scenario, name)
    # each rank holds the state of its own share only, and the shares cover the model
    assert 0 < r0['local_state'] < r0['n_params'] and r0['local_state'] + r1['local_state'] == r0['n_params']
    for r in (r0, r1): assert_equal(r['resumed'], r['weights'], f'{scenario}: resumed from the consolidated state dict')

@pytest.mark.parametrize('scenario', FSDP)
def test_fsdp2_matches_unsharded_run(results, scenario):
    _, name, *ex = scenario.split(':')
    execution = ex[0] if ex else 'auto'
    r0, r1 = results[scenario]
    assert_ranks_agree_with_one_process((r0, r1), scenario, name)
    assert r0['local_shapes'] != [tuple(v.shape) for v in r0['weights'].values()], 'parameters must be sharded'
    for r in (r0, r1):
        if execution == 'per_param': assert r['counts'] == {'fused': 0, 'per_param': 4 * W.STEPS}
        else:   # the shards were fused: no fallback, on the backend asked for
            assert r['counts'] == {'fused': 4 * W.STEPS, 'per_param': 0} and r['reasons'] == [], r['reasons']
            assert r['backends'] == (['foreach'] if execution == 'foreach' else ['cpu'])

@pytest.mark.parametrize('scenario', [s for s in FSDP if not s.endswith('per_param')])
def test_fused_shards_communicate_only_for_per_tensor_sums(results, scenario):
    "Element-wise programs: no collective; LAMB and LARC: their norms' sums are added over the shards"
    name, foreach = scenario.split(':')[1], scenario.endswith('foreach')
    for r in results[scenario]:
        # every collective of the step is one of the engine's own (no DTensor operation ran on a whole tensor)
        assert r['step_collectives'] == r['engine_all_reduces']
        if name not in ('Lamb', 'Larc'): assert r['engine_all_reduces'] == 0
        # the C kernel: one all-reduce per bucket at its one phase boundary (both norms at once); the
        # interpreter: one per norm (LAMB has two)
        else: assert r['engine_all_reduces'] == r['buckets'] * (2 if foreach and name == 'Lamb' else 1), r

def test_lamb_and_larc_norms_are_of_the_whole_parameter(results):
    "Norms of the local shards would give other trust ratios, and other weights (checked above); here: they communicate"
    for name in ('Lamb', 'Larc'): assert results[f'fsdp:{name}'][0]['engine_all_reduces'] > 0
    assert results['fsdp:Lamb:per_param'][0]['step_collectives'] > 0   # the per-parameter path: DTensor's own

def test_lookahead_under_fsdp2_is_sharded_and_syncs_without_communication(results):
    r0, r1 = results['fsdp:ranger']
    assert r0['slow_sharded_like_params'] and r1['slow_sharded_like_params']
    assert r0['step_collectives'] == 0   # RAdam's step and the synchronisation: element-wise on the shards

def test_fsdp2_strict_fused_execution_runs_every_shard_fused(results):
    r0, r1 = results['fsdp_strict']
    for r in (r0, r1): assert r['counts'] == {'fused': 4 * W.STEPS, 'per_param': 0} and r['state_is_sharded']
    assert_ranks_agree_with_one_process((r0, r1), 'fsdp_strict', 'Lamb')

def test_sharded_lookahead_checkpoint_resumes_exactly(results):
    for r in results['fsdp_checkpoint']:
        assert r['count_after_load'] == W.FIRST
        assert_equal(r['resumed'], r['weights'], 'resumed from a torch.distributed.checkpoint')
    assert_close(results['fsdp_checkpoint'][0]['weights'], W.reference('ranger'), 'sharded ranger vs one process')

def _fastai_run(tmp_path, *flags):
    "fastai's distrib_ctx with 2 CPU processes (torchrun); what each rank saved"
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(WORLD),
           str(Path(__file__).parent/'fastai_distrib_worker.py'), str(tmp_path), *flags]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [torch.load(tmp_path/f'fastai.rank{r}.pt', weights_only=False) for r in range(WORLD)]

def test_fastai_distributed_data_loader_needs_cuda(tmp_path):
    "Why fastai's own distributed path cannot run on a CPU-only torch: DistributedDL broadcasts indices on CUDA"
    for r in _fastai_run(tmp_path): assert r['error'] == 'AssertionError: Torch not compiled with CUDA enabled'

def test_ranger_trains_under_fastai_distrib_ctx_with_a_cpu_broadcast(tmp_path):
    "The same run with that one method doing its broadcast on CPU: Accelerate's DDP, fastai's loop, fastopt.ranger"
    import fastai_distrib_worker as F
    r0, r1 = _fastai_run(tmp_path, '--cpu-broadcast')
    assert r0['wrapped'] == r1['wrapped'] == 'DistributedDataParallel'
    n_batches = F.N_EPOCH * (224 // 16) // WORLD                   # each rank takes half of every epoch
    assert r0['n_batches'] == r1['n_batches'] == n_batches and r0['count'] == r1['count'] == n_batches
    assert_equal(r0['weights'], r1['weights'], 'rank 0 vs rank 1')
    first, last = sum(r0['losses'][:4]) / 4, sum(r0['losses'][-4:]) / 4
    assert last < 0.5 * first, (first, last)
