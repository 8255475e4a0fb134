"""torch.distributed: 2 CPU processes with gloo (torchrun, or the environment torchrun sets).

Exact comparisons with a single process run with one thread per process (OMP_NUM_THREADS=1,
torch.set_num_threads(1)): float results depend on the thread count of the CPU kernels, and
torchrun gives each of its processes one thread by default.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import condense
from argument import parse_args
from conftest import ROOT
from misc import dist as distributed
from misc.utils import safe_load

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def env1(**extra):
    """The environment of a launched process: one thread, no inherited torchrun variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    return {**env, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), **extra}


def cli(data_dir, save_dir, *extra):
    return ['-d', 'fashion', '--data_dir', str(data_dir), '--ipc', '2', '-f', '2', '--niter', '1',
            '--inner_loop', '25', '--width', '0.125', '--batch_real', '7', '--device', 'cpu',
            '--seed', '3', '--test', '--save_dir', str(save_dir), *extra]


def torchrun(argv, launcher=('--standalone', ), timeout=240):
    return subprocess.run([*TORCHRUN, *launcher, '--nproc_per_node', '2',
                           str(ROOT / 'condense.py'), *argv], cwd=ROOT, env=env1(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_thread():
    """One intra-op thread, as each torchrun process has (exact comparisons; also much faster
    than 2 threads on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def losses(folder):
    return [json.loads(ln)['loss'] for ln in open(folder / 'metrics.jsonl')
            if json.loads(ln)['event'] == 'loss']


# ---------------------------------------------------------------- helpers in one process
def test_helpers_are_no_ops_in_one_process():
    assert not distributed.launched()
    assert distributed.my_share([3, 1, 2]) == [3, 1, 2]
    assert distributed.shard(5) == (None, 1.0)
    t = torch.arange(4.)
    distributed.all_reduce_sum_([t])
    distributed.broadcast_([t])
    distributed.barrier()
    assert t.tolist() == [0, 1, 2, 3]
    assert distributed.broadcast_object({'a': 1}) == {'a': 1}
    assert distributed.all_gather_object(7) == [7]
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.ones(3, 2), torch.zeros(3, dtype=torch.long))]
    with distributed.DataParallel(opt) as dp:
        assert list(dp.batches(batches)) == batches
    assert distributed.init_distributed('cpu') == torch.device('cpu')


@pytest.mark.parametrize('world', [2, 3, 4])
def test_shards_cover_each_batch_and_weights_give_its_mean(monkeypatch, world):
    monkeypatch.setattr(distributed, 'get_world_size', lambda: world)
    for n in range(1, 10):
        values = torch.randn(n).double()
        total, rows_seen = 0.0, set()
        for rank in range(world):
            monkeypatch.setattr(distributed, 'get_rank', lambda: rank)
            rows, weight = distributed.shard(n)
            assert len(rows) >= 1  # no rank trains on an empty batch
            rows_seen |= set(rows.tolist())
            total += weight * values[rows].mean()
        assert rows_seen == set(range(n))
        assert total == pytest.approx(values.mean().item(), abs=1e-12)


def test_bad_timeout_is_a_user_error(monkeypatch):
    from misc.utils import UserError
    monkeypatch.setenv('IDC_DIST_TIMEOUT', 'soon')
    with pytest.raises(UserError, match='IDC_DIST_TIMEOUT'):
        distributed._seconds('IDC_DIST_TIMEOUT', 300)


# ---------------------------------------------------------------- helpers across 2 processes
WORKER = textwrap.dedent('''
    import os, sys, torch
    import torch.nn.functional as F
    from misc import dist as distributed
    from misc.utils import get_rank, get_world_size, is_dist, is_main_process
    from train import train_epoch

    device = distributed.init_distributed('cpu')
    rank = get_rank()
    assert is_dist() and get_world_size() == 2 and rank == int(os.environ['RANK'])
    assert distributed.backend() == 'gloo' and is_main_process() == (rank == 0)
    torch.manual_seed(rank)  # different on purpose: rank 0's network must win
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    distributed.broadcast_module(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)  # the same batches on both ranks
    batches = [(torch.randn(n, 3, 2, 2, generator=g), torch.randint(3, (n, ), generator=g))
               for n in (5, 1, 8, 3)]
    with distributed.DataParallel(opt) as dp:
        train_epoch(model, dp.batches(batches), opt)
    t = torch.tensor([float(rank + 1)])
    distributed.all_reduce_sum_([t])
    assert t.item() == 3
    assert distributed.all_gather_object(rank) == [0, 1]
    assert distributed.broadcast_object('r%d' % rank) == 'r0'
    assert distributed.my_share(range(5)) == list(range(rank, 5, 2))
    distributed.barrier()
    torch.save(model.state_dict(), sys.argv[1] + '/rank%d.pt' % rank)
    distributed.cleanup()
''')


def test_data_parallel_update_equals_one_process_and_ranks_stay_identical(tmp_path):
    """Two ranks, each on its share of every batch (including a 1-image batch), take the same
    SGD steps as one process on the whole batches; broadcast and gathers work."""
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    r = subprocess.run([*TORCHRUN, '--standalone', '--nproc_per_node', '2', str(script),
                        str(tmp_path)], cwd=ROOT, env=env1(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = safe_load(tmp_path / 'rank0.pt'), safe_load(tmp_path / 'rank1.pt')
    # the one-process run, from rank 0's network
    from train import train_epoch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, 2, 2, generator=g), torch.randint(3, (n, ), generator=g))
               for n in (5, 1, 8, 3)]
    train_epoch(model, batches, opt)
    for k, v in model.state_dict().items():
        assert torch.equal(a[k], b[k]), k  # the ranks hold the same network, bit for bit
        assert torch.allclose(a[k], v, atol=1e-6), k


# ---------------------------------------------------------------- condense.py under torchrun
def test_two_ranks_follow_one_process_and_test_py_evaluates(fake_fashion, tmp_path, one_thread):
    """--n_data 0 skips the network update, whose augmentation draws come from each rank's
    global stream (its gradients are averaged exactly, but the draws differ from one process):
    the matching then sees the same draws (per-class streams) and the same networks (rank 0's,
    which follows the one-process run), so 2 ranks give the same losses and the same S."""
    one, two = tmp_path / 'one', tmp_path / 'two'
    r = torchrun(cli(fake_fashion, two, '--n_data', '0'))
    assert r.returncode == 0, r.stderr[-3000:]
    condense.main(parse_args(cli(fake_fashion, one, '--n_data', '0'), mode='condense'))
    assert losses(one) == pytest.approx(losses(two), rel=1e-6)
    assert len(losses(two)) == 4
    (s1, t1), (s2, t2) = safe_load(one / 'data.pt'), safe_load(two / 'data.pt')
    assert t2.tolist() == sorted(list(range(10)) * 2)  # every class, class-major
    assert torch.equal(t1, t2) and torch.allclose(s1, s2, atol=1e-6)
    c1, c2 = safe_load(one / 'checkpoint.pt'), safe_load(two / 'checkpoint.pt')
    for c in range(10):  # streams gathered from the rank that owns each class
        assert torch.equal(c1['gens'][c], c2['gens'][c])
        assert c1['sampler']['cls'][c]['pos'] == c2['sampler']['cls'][c]['pos']
    assert len(c2['rng_ranks']) == 2
    # logs and files from rank 0 only
    log = (two / 'log.txt').read_text()
    assert log.count('Done:') == 1 and '2 processes, gloo' in log
    assert 'warning' not in log
    assert r.stdout.count('Saved data.pt and img4.png') == 1
    # test.py evaluates the gathered data
    from test import main as test_main
    targs = parse_args(['-d', 'fashion', '--data_dir', str(fake_fashion), '--ipc', '2', '-f', '2',
                        '--data_path', str(two / 'data.pt'), '--epochs', '2', '--width', '0.125',
                        '--device', 'cpu', '--save_dir', str(tmp_path / 'eval')], mode='test')
    summary = test_main(targs)
    assert summary['n_train'] == 10 * 2 * 4 and summary['best_mean'] >= 0


def test_dead_rank_stops_the_other_then_resume_matches_uninterrupted(fake_fashion, tmp_path):
    """Rank 1 is killed mid-run: rank 0 exits with a clear message (gloo sees the closed
    connection at once), the checkpoint stays loadable, and --resume under torchrun ends where
    an uninterrupted 2-rank run ends (the network updates included: every rank's RNG state is
    in the checkpoint). The uninterrupted run uses multi-node style rendezvous options."""
    ref, cut = tmp_path / 'ref', tmp_path / 'cut'
    argv = cli(fake_fashion, ref, '--n_data', '20', '--inner_loop', '5')
    r = torchrun(argv, launcher=('--nnodes', '1', '--node_rank', '0', '--rdzv_backend', 'c10d',
                                 '--rdzv_endpoint', f'localhost:{free_port()}'))
    assert r.returncode == 0, r.stderr[-3000:]

    argv = cli(fake_fashion, cut, '--n_data', '20', '--inner_loop', '5')
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / 'condense.py'), *argv], cwd=ROOT,
                              env=env1(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2',
                                       MASTER_ADDR='127.0.0.1', MASTER_PORT=port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    ckpt = cut / 'checkpoint.pt'
    deadline = time.time() + 120
    while time.time() < deadline and procs[0].poll() is None:
        if ckpt.is_file() and safe_load(ckpt)['it'] >= 3:
            break
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    t0 = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert time.time() - t0 < 30
    assert procs[0].returncode == 2, err[-2000:]
    assert 'rank 0 lost contact with the other ranks' in err and '--resume' in err
    state = safe_load(ckpt)
    assert 3 <= state['it'] < 20, 'the run ended before rank 1 could be killed'

    r = torchrun(argv + ['--resume'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resumed from {ckpt} at outer iteration {state['it']}/20" in r.stdout
    a, b = safe_load(ref / 'data.pt'), safe_load(cut / 'data.pt')
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)


# ---------------------------------------------------------------- class-partitioned runs
def test_class_partitions_condense_separately_and_test_py_concatenates(fake_fashion, tmp_path,
                                                                      monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # results/ goes here
    base = ['-d', 'fashion', '--data_dir', str(fake_fashion), '--ipc', '2', '-f', '2',
            '--niter', '1', '--inner_loop', '50', '--width', '0.125', '--batch_real', '8',
            '--n_data', '16', '--device', 'cpu', '--epochs', '1', '--nclass_sub', '5']
    folders = []
    for phase in (0, 1):
        args = parse_args(base + ['--phase', str(phase)], mode='condense')
        condense.main(args)
        folders.append(args.save_dir)
        data, targets = safe_load(os.path.join(args.save_dir, 'data.pt'))
        assert data.shape == (10, 1, 28, 28)
        assert targets.tolist() == sorted(list(range(5 * phase, 5 * phase + 5)) * 2)
    assert folders[0].endswith('_ipc2_5_phase0') and folders[1].endswith('_ipc2_5_phase1')
    name = os.path.relpath(folders[0], 'results')[:-len('_ipc2_5_phase0')]
    from test import main as test_main
    targs = parse_args(['-d', 'fashion', '--data_dir', str(fake_fashion), '--ipc', '2', '-f', '2',
                        '--name', name, '--epochs', '2', '--width', '0.125', '--device', 'cpu',
                        '--save_dir', str(tmp_path / 'eval')], mode='test')
    summary = test_main(targs)
    assert summary['n_train'] == 10 * 2 * 4
    assert len(summary['source']) == 2
    assert 'concatenated 2 class partitions' in (tmp_path / 'eval' / 'log.txt').read_text()
