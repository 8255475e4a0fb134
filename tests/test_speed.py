"""The speed machinery keeps the math: allocator settings, compiled matching and training
(against eager), channels_last validation, compilation fallbacks, and the benchmark script."""
import contextlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import condense
import misc.device as device_mod
from argument import parse_args
from conftest import CUDA, ROOT, needs_cuda
from misc.device import call_compiled, want_compile, want_graphs
from misc.utils import UserError
from models import get_model
from train import CompiledForward, CompiledLoss, GraphedStep, train_epoch, validate

CPU = torch.device('cpu')


def small_net(seed=0):
    torch.manual_seed(seed)
    return get_model('convnet', 10, 1, 28, 3, 0.125)


# ---------------------------------------------------------------- allocator
ALLOC_PROBE = r'''
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from misc.device import tune_cpu_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',
                'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = MallInfo2
applied = tune_cpu_allocator() if sys.argv[2] == 'tune' else None
import torch
before = libc.mallinfo2().hblks
x = torch.ones(64, 128, 32, 32)  # 32 MiB: one activation of a batch of 64
print(applied, libc.mallinfo2().hblks - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc only')
def test_tuned_allocator_serves_large_tensors_from_the_heap():
    # Without the setting glibc maps a 32 MiB block of its own (a fresh mmap, page faults on
    # every use); with it the block comes from the heap.
    def probe(mode):
        r = subprocess.run([sys.executable, '-c', ALLOC_PROBE, str(ROOT), mode],
                           capture_output=True, text=True, check=True)
        return r.stdout.split()
    assert probe('default') == ['None', '1']
    assert probe('tune') == ['True', '0']


def test_setup_backends_can_leave_the_allocator_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(device_mod, 'tune_cpu_allocator', lambda: calls.append(1))
    device_mod.setup_backends(CPU, allocator=False)
    assert calls == []
    device_mod.setup_backends(CPU)
    assert calls == [1]


# ---------------------------------------------------------------- when to compile
def test_want_compile_rules():
    assert want_compile('on', CPU, 1) and not want_compile('off', CPU, 10**6)
    assert want_compile('auto', CPU, 1000) and not want_compile('auto', CPU, 999)
    assert want_compile('auto', torch.device('cuda'), 5000)
    # training steps: compiled on the CPU only (slower than eager on an H200)
    assert want_compile('auto', CPU, 1000, 'training')
    assert not want_compile('auto', torch.device('cuda'), 10**6, 'training')
    assert want_compile('on', torch.device('cuda'), 1, 'training')
    assert not want_compile('auto', torch.device('mps'), 10**6)


@pytest.mark.parametrize('argv, compiled', [(['--niter', '10'], True), (['--niter', '9'], False),
                                            (['--niter', '2000', '--compile', 'off'], False),
                                            (['--niter', '1', '--compile'], True)])
def test_condense_compiles_long_runs_by_default(argv, compiled):
    args = parse_args(['-d', 'fashion', '--ipc', '1', *argv], mode='condense')
    assert condense.compiles(args, CPU) == (compiled, 'compile' if compiled else None)
    # on CUDA: the network updates as CUDA graphs (--cuda_graphs auto)
    assert condense.compiles(args, torch.device('cuda')) == (compiled, 'graphs')
    args.cuda_graphs = 'off'
    if compiled:  # without graphs, on CUDA only the matching compiles by default
        assert condense.compiles(args, torch.device('cuda')) == (True, args.compile == 'on'
                                                                  and 'compile' or None)
    args.match_impl = 'loop'  # the original's way: neither
    assert condense.compiles(args, torch.device('cuda')) == (False, None)


# ---------------------------------------------------------------- compiled = eager
def _match_args(metric, layout='channels_last'):
    return SimpleNamespace(match='grad', bias=False, fc=False, metric=metric, batch_classes=1,
                           match_layout=layout)


@pytest.mark.parametrize('metric, layout', [('mse', 'channels_last'), ('l1', 'channels_last'),
                                            ('cos', 'channels_last'), ('mse', 'nchw')])
def test_compiled_matching_equals_eager(metric, layout):
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x_real, x_syn = torch.randn(12, 1, 28, 28, generator=g), torch.randn(8, 1, 28, 28, generator=g)
    # augmentation outputs: odd strides, and a real batch that carries the syn batch's graph
    y_real, y_syn = torch.full((12, ), 4), torch.full((8, ), 4)
    eager = condense.GradMatcher(model, _match_args(metric, layout))(x_real, x_syn, y_real,
                                                                     y_syn)
    x_real = torch.empty_strided(x_real.shape, (784, 1, 28, 1)).copy_(x_real).requires_grad_()
    said = []  # a compilation failure would fall back to eager and say so here
    matcher = condense.GradMatcher(model, _match_args(metric, layout), compile=True,
                                   log=said.append)
    assert matcher.key is not None
    assert matcher.memory_format == {'nchw': torch.contiguous_format,
                                     'channels_last': torch.channels_last}[layout]
    for _ in range(2):  # the compiled call, then the cached one
        loss, grad = matcher(x_real, x_syn, y_real, y_syn)
        assert said == []
        assert loss.item() == pytest.approx(eager[0].item(), rel=1e-5)
        assert grad.shape == x_syn.shape
        assert ((grad - eager[1]).norm() / eager[1].norm()).item() < 1e-4


@pytest.mark.parametrize('layout', ['channels_last', 'nchw'])
def test_compiled_matching_is_the_same_math_in_float64(layout):
    model = small_net().double()
    g = torch.Generator().manual_seed(4)
    x_real = torch.randn(12, 1, 28, 28, generator=g, dtype=torch.float64)
    x_syn = torch.randn(8, 1, 28, 28, generator=g, dtype=torch.float64)
    y_real, y_syn = torch.full((12, ), 2), torch.full((8, ), 2)
    args = _match_args('l1', layout)
    eager = condense.GradMatcher(model, args)(x_real, x_syn, y_real, y_syn)
    said = []
    loss, grad = condense.GradMatcher(model, args, compile=True, log=said.append)(
        x_real, x_syn, y_real, y_syn)
    assert said == []
    assert loss.item() == pytest.approx(eager[0].item(), rel=1e-10)
    assert torch.allclose(grad, eager[1], rtol=1e-8, atol=1e-10)


def test_compiled_training_loss_equals_eager():
    a, b = small_net(), small_net()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(10, (16, ), generator=g))
               for _ in range(3)]
    torch.manual_seed(5)  # the CutMix draws
    ra = train_epoch(a, batches, opt_a, mixup='cut', mix_p=0.5)
    torch.manual_seed(5)
    said = []
    rb = train_epoch(b, batches, opt_b, mixup='cut', mix_p=0.5,
                     step=CompiledLoss(b, said.append))
    assert said == []
    assert rb['loss'] == pytest.approx(ra['loss'], rel=1e-4)
    assert rb['top1'] == ra['top1']
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-5)
        assert pb.grad is not None


# ---------------------------------------------------------------- CUDA graphs = eager
def test_want_graphs_rules():
    cuda = torch.device('cuda')
    assert want_graphs('auto', cuda) and not want_graphs('auto', cuda, amp=True)
    assert not want_graphs('auto', CPU) and not want_graphs('auto', torch.device('mps'))
    assert want_graphs('on', cuda) and not want_graphs('off', cuda)
    with pytest.raises(UserError, match='needs a CUDA device'):
        device_mod.setup_backends(CPU, cuda_graphs='on')


@pytest.mark.parametrize('argv, cuda, cpu', [
    ([], 'graphs', 'compile'), (['--amp'], None, 'compile'),
    (['--cuda_graphs', 'off'], None, 'compile'), (['--cuda_graphs', 'off', '--compile', 'on'],
                                                  'compile', 'compile'),
    (['--compile', 'off'], 'graphs', None)])
def test_train_step_kind_for_test_py(argv, cuda, cpu):
    # test.py's and train.py's training steps: CUDA graphs on CUDA unless --amp or
    # --cuda_graphs off; torch.compile on the CPU for runs of at least 1000 steps
    from train import train_step_kind
    args = parse_args(['-d', 'fashion', '--ipc', '1', *argv], mode='test')
    assert train_step_kind(args, torch.device('cuda'), 10**6) == cuda
    assert train_step_kind(args, CPU, 10**6) == cpu
    # --compile auto compiles runs of at least 1000 steps; on compiles any
    assert train_step_kind(args, CPU, 999) == (cpu if args.compile == 'on' else None)


def test_the_benchmark_exits_2_on_a_user_error(fake_fashion):
    r = subprocess.run([sys.executable, str(ROOT / 'misc' / 'benchmark.py'), '--data_dir',
                        fake_fashion, '--device', 'cpu', '--extra=--cuda_graphs on'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'needs a CUDA device' in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / 'misc' / 'benchmark.py'), '--data_dir',
                        fake_fashion, '--reference_runs', '0'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and '--reference_runs must be at least 1' in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / 'misc' / 'benchmark.py'), '--data_dir',
                        fake_fashion, '--reference', '--ours'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and 'give one of them' in r.stderr


def test_cuda_graphs_on_without_a_gpu_exits_2_before_writing(fake_fashion, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'test.py'), '-d', 'fashion', '--data_dir',
                        str(fake_fashion), '-s', 'random', '--ipc', '1', '--device', 'cpu',
                        '--cuda_graphs', 'on'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'needs a CUDA device' in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('device', ['cpu', CUDA])
@pytest.mark.parametrize('norm', ['instance', 'batch'])
def test_graphed_training_steps_equal_eager_ones(device, norm):
    # Four epochs of 16 + 16 + 10 images (two batch shapes: two graphs, each after two eager
    # warm-up steps), CutMix on about half of the batches, momentum, and a learning-rate drop
    # between the epochs: the graphed network
    # ends where the eager one does (batch norm statistics included). On the CPU a GraphedStep
    # declines every batch, and train_epoch computes them eagerly.
    nets = []
    for graphed in (False, True):
        torch.manual_seed(0)
        net = get_model('convnet', 10, 1, 28, 3, 0.125, norm_type=norm).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(2)
        batches = [(torch.randn(n, 1, 28, 28, generator=g).to(device),
                    torch.randint(10, (n, ), generator=g).to(device)) for n in (16, 16, 10)]
        said = []
        step = GraphedStep(net, said.append) if graphed else None
        torch.manual_seed(5)  # the CutMix draws
        results = []
        for epoch in range(2 + GraphedStep.WARMUP):  # the warm-up steps are real steps too
            results.append(train_epoch(net, batches, opt, mixup='cut', mix_p=0.5, step=step))
            opt.param_groups[0]['lr'] *= 0.2
        assert said == []
        if graphed:
            assert len(step.graphs) == (2 if device == 'cuda' else 0)
        nets.append((net, results))
    (a, ra), (b, rb) = nets
    for x, y in zip(ra, rb):
        assert y['loss'] == pytest.approx(x['loss'], rel=1e-4)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(ta.float(), tb.float(), rtol=1e-4, atol=1e-5), name
    assert all(p.grad is not None for p in b.parameters())


@needs_cuda
def test_graphed_training_epoch_waits_on_the_gpu_once():
    # Replays copy the batch in and the gradients out without a host synchronisation: an
    # epoch of graphed steps waits on the GPU once, for its metrics.
    import warnings
    torch.manual_seed(0)
    net = get_model('convnet', 10, 1, 28, 3, 0.125).to('cuda')
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    batches = [(torch.randn(16, 1, 28, 28, device='cuda'), torch.randint(10, (16, ), device='cuda'))
               for _ in range(3)]
    step = GraphedStep(net, print)
    train_epoch(net, batches, opt, mixup='cut', mix_p=0.5, step=step)  # warm-up and capture
    assert len(step.graphs) == 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            train_epoch(net, batches, opt, mixup='cut', mix_p=0.5, step=step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message).lower()]
    assert len(syncs) <= 1, syncs


def test_compiled_loss_skips_networks_with_buffers():
    net = get_model('convnet', 10, 1, 28, 3, 0.125, norm_type='batch')
    assert CompiledLoss(net).key is None
    assert CompiledLoss(net)(net, torch.randn(2, 1, 28, 28), None, None, 1.0) is None


def test_a_failed_compilation_falls_back_to_eager_and_says_so_once(monkeypatch):
    class Boom(Exception):
        pass

    def broken(*a):
        raise Boom('no C++ compiler\nmore detail')
    monkeypatch.setattr(device_mod, '_COMPILED', {})
    monkeypatch.setattr(device_mod, '_COMPILED_OK', set())
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: broken)
    said = []
    model = small_net()
    matcher = condense.GradMatcher(model, _match_args('mse'), compile=True, log=said.append)
    x, y = torch.randn(4, 1, 28, 28), torch.full((4, ), 1)
    eager = condense.GradMatcher(model, _match_args('mse'))(x, x + 1, y, y)
    for _ in range(2):
        loss, grad = matcher(x, x + 1, y, y)
        assert loss.item() == eager[0].item() and torch.equal(grad, eager[1])
    assert len(said) == 1 and 'Boom: no C++ compiler' in said[0] and 'more detail' not in said[0]


def test_call_compiled_passes_standard_strides_and_no_aliases(monkeypatch):
    seen = []

    def spy(*args):
        seen.append(args)
        return 0
    monkeypatch.setattr(device_mod, '_COMPILED', {'k': spy})
    x = torch.empty_strided((3, 1, 4, 4), (16, 1, 4, 1)).copy_(torch.randn(3, 1, 4, 4))
    y = torch.arange(3)
    call_compiled('k', (x, y, y, {'w': x}), print)
    out = seen[0]
    assert out[0].stride() == (16, 16, 4, 1) and torch.equal(out[0], x)
    assert out[1] is y and out[2] is not y and torch.equal(out[2], y)
    assert out[3]['w'] is not out[0] and torch.equal(out[3]['w'], x)
    call_compiled('k', (x, ), print, memory_format=torch.channels_last)
    assert seen[1][0].stride() == (16, 1, 4, 1)


# ---------------------------------------------------------------- validation
def test_validate_in_channels_last_equals_nchw_and_restores_the_network():
    model = small_net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 1, 28, 28, generator=g), torch.randint(10, (30, ), generator=g)
    with torch.no_grad():
        out = model(x)
    res = validate(model, [(x[:16], y[:16]), (x[16:], y[16:])])
    ref = torch.nn.functional.cross_entropy(out, y).item()
    assert res['loss'] == pytest.approx(ref, rel=1e-5)
    assert res['top1'] == pytest.approx((out.argmax(1) == y).float().mean().item() * 100)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize('norm', ['instance', 'batch'])
def test_compiled_validation_equals_eager(norm):
    # The compiled forward pass (parameters and buffers as inputs, channels_last) gives the
    # eager validation's loss and accuracies; batch norm uses its running statistics.
    torch.manual_seed(0)
    model = get_model('convnet', 10, 1, 28, 3, 0.125, norm_type=norm)
    if norm == 'batch':
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 1, 28, 28) * 2 + 1)  # running statistics away from (0, 1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 1, 28, 28, generator=g), torch.randint(10, (30, ), generator=g)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    said = []
    eager = validate(model, batches)
    fast = validate(model, batches, forward=CompiledForward(model, said.append))
    assert said == []
    assert fast['loss'] == pytest.approx(eager['loss'], rel=1e-5)
    assert fast['top1'] == eager['top1'] and fast['top5'] == eager['top5']
    assert not model.training and all(p.is_contiguous() for p in model.parameters())


# ---------------------------------------------------------------- the benchmark
def test_benchmark_prints_one_json_line_with_the_reference(fake_fashion):
    r = subprocess.run([sys.executable, str(ROOT / 'misc' / 'benchmark.py'), '--data_dir',
                        fake_fashion, '--ipc', '1', '--steps', '1', '--eval_epochs', '1',
                        '--device', 'cpu', '--reference_runs', '2',
                        '--extra=--width 0.125 --batch_real 8 --n_data 16'],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ('step_s', 'match_s', 'net_s', 'gflops', 'conv_peak_gflops', 'eval_epoch_s',
                'val_pass_s', 'eval_1000_epochs_s', 'speedup', 'eval_speedup'):
        assert out[key] > 0, key
    # the --reproduce settings (200,000 inner steps) on the CPU compile both
    assert out['compiled_match'] is True and out['net_steps'] == 'compile'
    assert out['eval_steps'] == 'compile'
    # the JSON rounds each figure to 4 decimals
    assert out['step_s'] == pytest.approx(out['match_s'] + out['net_s'], abs=2e-4)
    ref = out['reference']
    assert ref['compiled_match'] is False and ref['net_steps'] == 'eager'
    assert ref['eval_steps'] == 'eager'
    assert out['speedup'] == pytest.approx(ref['step_s'] / out['step_s'], rel=1e-2)
    # two reference processes: each one's figures, and the lower of the two is compared
    runs = out['reference_runs']
    assert len(runs) == 2
    assert ref['step_s'] == min(r['step_s'] for r in runs)
    assert ref['eval_1000_epochs_s'] == min(r['eval_1000_epochs_s'] for r in runs)
    # ours measured again in a fresh process between the two references: each round's ratio,
    # and the median (the lower of two) of the rounds
    ours = out['ours_runs']
    assert len(ours) == 2 and ours[0]['step_s'] == out['step_s']
    assert ours[1]['step_s'] > 0 and ours[1]['conv_peak_gflops'] > 0
    ratios = sorted(r['step_s'] / o['step_s'] for o, r in zip(ours, runs))
    assert out['speedup_paired'] == pytest.approx(ratios[0], rel=1e-2)
    eval_ratios = sorted(r['eval_1000_epochs_s'] / o['eval_1000_epochs_s']
                         for o, r in zip(ours, runs))
    assert out['eval_speedup_paired'] == pytest.approx(eval_ratios[0], rel=1e-2)
    assert out['loop_same_process']['step_s'] > 0
    assert out['eval_images'] == 10 * 4  # ipc 1, factor 2
    # what it ran on, so that figures from different machines are told apart
    m = out['machine']
    assert isinstance(m['cpu'], str) and m['cpu'] and m['cores'] >= 1
    assert isinstance(m['cpu_bf16'], bool) and m['gpu'] is None


def test_the_references_original_data_path_serves_the_same_images(fake_fashion):
    # The reference evaluates with the original's data path (one image at a time; the test
    # split as PIL images through ToTensor and Normalize): its batches must hold the values
    # test.py's batches hold, so that only the speed differs.
    import torchvision.transforms as T
    from data import eval_loader, load_split, normalizer
    from misc.benchmark import PerImage, original_loaders
    args = parse_args(['-d', 'fashion', '--data_dir', fake_fashion, '--ipc', '1', '-f', '2',
                       '--reproduce'], mode='condense')
    val_set = load_split(args, train=False)
    torch.manual_seed(0)
    images, targets = torch.rand(40, 1, 28, 28), torch.arange(10).repeat(4)
    train, val = original_loaders(args, images, targets, val_set, CPU)
    assert len(val) == -(-len(val_set) // (args.batch_size // 2))
    got = torch.cat([x for x, _ in val])
    want = torch.cat([x for x, _ in eval_loader(val_set, 'fashion', CPU)])
    assert got.shape == want.shape == (len(val_set), 1, 28, 28)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(torch.cat([y for _, y in val]), val_set.targets)
    # training: one shuffled batch of the 40 normalized images with their labels
    assert len(train) == 1
    x, y = next(iter(train))
    dist = torch.cdist(x.flatten(1), normalizer('fashion')(images).flatten(1),
                       compute_mode='donot_use_mm_for_euclid_dist')
    order = dist.argmin(1)
    assert dist.min(1).values.max() < 1e-4 and len(set(order.tolist())) == 40
    assert torch.equal(targets[order], y)
    # 3-channel uint8 data (CIFAR's layout) becomes the same values too
    rgb = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    ds = PerImage(rgb, torch.zeros(6), T.ToTensor(), pil=True)
    assert torch.equal(torch.stack([ds[i][0] for i in range(6)]), rgb.float() / 255)


@pytest.mark.parametrize('amp', [False, True])
def test_the_benchmarks_evaluation_runs_under_amp_when_asked(fake_fashion, monkeypatch, amp):
    # test.py trains and validates under --amp's autocast; the benchmark's evaluation must too,
    # or its --amp figures are fp32's
    import misc.benchmark as bench
    from data import load_split
    seen = []

    def spy(fn):
        def wrapped(*a, **kw):
            ctx = kw.get('ctx', a[2] if fn.__name__ == 'validate' and len(a) > 2 else None)
            seen.append((fn.__name__, isinstance(ctx, torch.autocast)))
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(bench, 'train_epoch', spy(bench.train_epoch))
    monkeypatch.setattr(bench, 'validate', spy(bench.validate))
    argv = ['-d', 'fashion', '--data_dir', fake_fashion, '--ipc', '1', '-f', '2', '--reproduce',
            '--width', '0.125', '--compile', 'off', '--device', 'cpu'] + (['--amp'] if amp else [])
    args = parse_args(argv, mode='condense')
    images, targets = torch.rand(40, 1, 28, 28), torch.arange(10).repeat(4)
    out = bench.bench_eval(args, CPU, images, targets, load_split(args, train=False), 1, False)
    assert out['eval_epoch_s'] > 0 and out['val_pass_s'] > 0
    assert {name for name, _ in seen} == {'train_epoch', 'validate'}
    assert all(under == amp for _, under in seen)


def test_precision_script_prints_the_five_ways_against_float64(fake_fashion):
    r = subprocess.run([sys.executable, str(ROOT / 'misc' / 'precision.py'), '--data_dir',
                        fake_fashion, '--draws', '2', '--ipc', '2',
                        '--extra=--width 0.125 --batch_real 8'],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for way in ('eager_nchw', 'eager_channels_last', 'compiled_nchw', 'compiled_channels_last'):
        assert len(out[way]['per_draw']) == 2
        # float32 against float64: small, and not exactly zero for every draw
        assert 0 < out[way]['max'] < 0.05, (way, out[way])
        assert out[way]['median'] <= out[way]['max']
    # bf16 autocast (--amp): further from float64 than float32 is, and reported per draw
    amp = out['eager_nchw_amp']
    assert len(amp['per_draw']) == 2 and amp['median'] > out['eager_nchw']['median']


def _double_state(fake_fashion, **kw):
    """test_condense's matching state in float64: there the comparisons below test the math.
    In float32, the rounding of another kernel (channels_last, vmap) can flip a ReLU of this
    tiny network and move one class's loss by 0.3% (seen on this fake data, where float64
    agreed with one of the two)."""
    from test_condense import _state
    st = _state(fake_fashion, 2, 2, metric='mse', **kw)
    st['model'].double()
    st['syn'].data = st['syn'].data.detach().double().requires_grad_()
    st['opt'] = torch.optim.SGD([st['syn'].data], lr=0.1, momentum=st['args'].mom_img)
    return st


def _steps(step, st, *extra):
    return [step(st['args'], st['syn'], st['sampler'], st['model'], st['opt'], st['aug'],
                 st['gens'], contextlib.nullcontext(), *extra) for _ in range(3)]


@pytest.mark.parametrize('device', ['cpu', CUDA])
def test_compiled_match_step_equals_the_per_class_loop(fake_fashion, device):
    # The whole default step (compiled matching, closed-form momentum steps) against the
    # original's loop, for the same draws.
    runs = []
    for compiled in (False, True):
        st = _double_state(fake_fashion, device=device)
        said = []
        extra = (condense.GradMatcher(st['model'], st['args'], compile=True, log=said.append),
                 ) if compiled else ()
        losses = _steps(condense.match_step if compiled else condense.match_step_loop, st,
                        *extra)
        assert said == []
        runs.append((losses, st['syn'].data.detach().clone()))
    (l0, s0), (l1, s1) = runs
    assert l1 == pytest.approx(l0, rel=1e-6)  # match_step sums the losses in float32
    assert (s0 - s1).abs().max() < 1e-9
    assert (s1 - _double_state(fake_fashion, device=device)['syn'].data).abs().mean() > 1e-4


def test_a_compiler_that_cannot_even_start_is_reported_at_the_first_call(monkeypatch):
    def refuse(fn, **kw):
        raise RuntimeError('Dynamo is not supported on this Python')
    monkeypatch.setattr(device_mod, '_COMPILED', {})
    monkeypatch.setattr(device_mod, '_COMPILED_OK', set())
    monkeypatch.setattr(torch, 'compile', refuse)
    said = []
    key = device_mod.compiled('k', lambda: (lambda x: x))
    assert call_compiled(key, (torch.ones(2), ), said.append) is None
    assert call_compiled(key, (torch.ones(2), ), said.append) is None
    assert len(said) == 1 and 'Dynamo is not supported' in said[0]


@pytest.mark.parametrize('batch_classes, compiled, device', [
    (0, False, 'cpu'), (4, False, 'cpu'), (0, True, 'cpu'),
    *[pytest.param(*p, marks=needs_cuda) for p in ((0, False, 'cuda'), (0, True, 'cuda'))]])
def test_batched_match_step_equals_one_class_at_a_time(fake_fashion, batch_classes, compiled,
                                                       device):
    # --batch_classes: the classes' matchings vmapped into one computation (0: all 10; 4: groups
    # of 4, 4 and 2), for the same draws, give the same losses and the same update of S.
    runs = []
    for n in (1, batch_classes):
        st = _double_state(fake_fashion, batch_classes=n, device=device)
        said = []
        matcher = condense.GradMatcher(st['model'], st['args'], compile=compiled and n != 1,
                                       log=said.append)
        assert len(matcher.groups(list(range(10)))) == {1: 10, 0: 1, 4: 3}[n]
        losses = _steps(condense.match_step, st, matcher)
        assert said == []
        runs.append((losses, st['syn'].data.detach().clone()))
    (l0, s0), (l1, s1) = runs
    assert l1 == pytest.approx(l0, rel=1e-9)
    assert (s0 - s1).abs().max() < 1e-9
    assert (s1 - _double_state(fake_fashion, device=device)['syn'].data).abs().mean() > 1e-4


@needs_cuda
@pytest.mark.parametrize('batch_classes, compiled', [(1, False), (1, True), (0, True)])
def test_the_cuda_match_step_equals_the_cpu_one(fake_fashion, batch_classes, compiled):
    # The random draws stay on the CPU, so the GPU sees the same batches and augmentations:
    # in float64 the two devices give the same losses and the same update of S.
    runs = []
    for device in ('cpu', 'cuda'):
        st = _double_state(fake_fashion, batch_classes=batch_classes, device=device)
        said = []
        matcher = condense.GradMatcher(st['model'], st['args'], compile=compiled,
                                       log=said.append)
        losses = _steps(condense.match_step, st, matcher)
        assert said == []
        runs.append((losses, st['syn'].data.detach().cpu()))
    (l0, s0), (l1, s1) = runs
    assert l1 == pytest.approx(l0, rel=1e-6), (l0, l1)  # match_step sums the losses in float32
    # On an H200 S differed by 4.2e-7 at most here: the float32 images (uint8 / 255) differed by
    # an ulp between the devices (CUDA divided by a scalar as a product with its reciprocal;
    # to_float now multiplies on both), and this step moves S by about 16-90 times a change of
    # its inputs. Different draws or a wrong step would differ by about 1e-2.
    assert (s0 - s1).abs().max() < 1e-6, (s0 - s1).abs().max().item()


def test_all_classes_are_batched_by_default_on_cuda_only(fake_fashion):
    from test_condense import _state
    st = _state(fake_fashion, 2, 2)
    assert st['args'].batch_classes is None
    assert condense.GradMatcher(st['model'], st['args']).per_call == 1
    if torch.cuda.is_available():
        assert condense.GradMatcher(st['model'].to('cuda'), st['args']).per_call == 0


@needs_cuda
@pytest.mark.parametrize('batch_classes, compiled', [(1, False), (1, True), (0, True)])
def test_the_cuda_matching_step_waits_on_the_gpu_once(fake_fashion, batch_classes, compiled):
    # No host synchronisation per class: a matching step of 10 classes (real batches, decoding,
    # augmentation draws, closed-form steps) waits on the GPU once, for its loss.
    import warnings
    from test_condense import _state
    st = _state(fake_fashion, 2, 2, device='cuda', batch_classes=batch_classes)
    matcher = condense.GradMatcher(st['model'], st['args'], compile=compiled, log=print)

    def step():
        return condense.match_step(st['args'], st['syn'], st['sampler'], st['model'], st['opt'],
                                   st['aug'], st['gens'], contextlib.nullcontext(), matcher)
    step()  # warm-up (cuDNN autotuning, pinned-memory cache)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message).lower()]
    assert len(syncs) <= 1, syncs


def test_the_benchmark_counts_the_same_flops_for_batched_classes(fake_fashion):
    # The same math, the same FLOPs: torch's formula for a grouped convolution's backward
    # leaves the groups out of its weight gradient, which the benchmark corrects.
    from misc.benchmark import FlopCount
    from test_condense import _state
    totals = []
    for n in (1, 0):
        st = _state(fake_fashion, 2, 2, batch_classes=n)
        matcher = condense.GradMatcher(st['model'], st['args'])
        counter = FlopCount()
        with counter:
            _steps(condense.match_step, st, matcher)
        totals.append(counter.total)
    assert totals[0] > 0 and totals[1] == totals[0]


def test_amp_warns_only_on_a_cpu_without_bf16_instructions(monkeypatch):
    # bf16 autocast on a CPU that emulates bf16 made the benchmark 3.6x (step) and 4x
    # (evaluation) slower than fp32; the scripts log this line then
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False, raising=False)
    assert not device_mod.cpu_has_native_bf16()
    assert 'no bf16 instructions' in device_mod.slow_amp_warning(cpu, True)
    assert device_mod.slow_amp_warning(cpu, False) is None
    assert device_mod.slow_amp_warning(cuda, True) is None  # fp16 there
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True, raising=False)
    assert device_mod.cpu_has_native_bf16()
    assert device_mod.slow_amp_warning(cpu, True) is None
