import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import condense
from argument import parse_args
from conftest import CUDA, ROOT
from condense import Synthesizer, dist, match_loss, mix_grid
from misc.utils import safe_load


class ConstSampler:
    """class_sample(c, n, first=True) -> n images whose pixels all equal 100*c + index."""

    def __init__(self, nch, size):
        self.nch, self.size = nch, size

    def class_sample(self, c, n=None, first=False):
        vals = torch.arange(n, dtype=torch.float) + 100 * c
        return vals.view(n, 1, 1, 1).expand(n, self.nch, self.size, self.size).clone(), None


@pytest.mark.parametrize('size, factor', [(8, 1), (8, 2), (7, 2), (7, 3), (28, 3), (32, 3)])
def test_mix_init_places_each_real_image_in_its_cell(size, factor):
    ipc = 2
    syn = Synthesizer([0, 1], ipc, 1, size, factor)
    syn.init(ConstSampler(1, size), 'mix' if factor > 1 else 'random')
    s, rem = divmod(size, factor)
    sides = [s + 1 if i < rem else s for i in range(factor)]
    edges = np.cumsum([0] + sides)
    for c in (0, 1):
        for i in range(ipc):
            img = syn.data[c * ipc + i, 0]
            k = 0
            for r in range(factor):
                for q in range(factor):
                    cell = img[edges[r]:edges[r + 1], edges[q]:edges[q + 1]]
                    assert (cell == 100 * c + k * ipc + i).all()
                    k += 1
    assert syn.targets.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize('size, factor', [(8, 2), (7, 2), (7, 3), (28, 3)])
def test_decode_of_mixed_storage(size, factor):
    syn = Synthesizer([0, 1, 2], 2, 1, size, factor)
    syn.init(ConstSampler(1, size), 'mix')
    x, y = syn.decoded()
    assert x.shape == (3 * 2 * factor**2, 1, size, size)
    assert y.tolist() == sum([[c] * 2 * factor**2 for c in range(3)], [])
    if size % factor == 0:
        # each decoded crop is exactly one real image of the grid, upsampled
        vals = x.flatten(1)
        assert torch.allclose(vals.min(1).values, vals.max(1).values)
        # class 1, first crop of its first stored image holds real image 0 of class 1
        assert x[2 * factor**2, 0, 0, 0] == 100
    s, t = syn.sample(1, max_size=3)
    assert len(s) == 3 and (t == 1).all()


def test_noise_init_range():
    syn = Synthesizer([0], 5, 3, 8)
    syn.init(None, 'noise')
    assert 0 <= syn.data.min() and syn.data.max() <= 1 and syn.data.std() > 0.1


class TinyNet(nn.Module):
    """logits_k = w_k * mean(x) + b_k: its CE gradient has a closed form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)  # weight (2, 1, 1, 1): matched
        self.fc = nn.Linear(2, 2)  # 2-D: matched only with --fc
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.5, -0.3]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def hand_grad(x, y, w):
    """d CE / d w for logits = w * mean(x) (fc = identity): mean over the batch of
    (softmax - onehot) * mean(x)."""
    m = x.mean((1, 2, 3)).double()
    logits = m[:, None] * torch.tensor(w, dtype=torch.double)[None]
    p = torch.softmax(logits, 1)
    p[torch.arange(len(y)), y] -= 1
    return (p * m[:, None]).mean(0)


@pytest.mark.parametrize('metric', ['mse', 'l1', 'l1_mean', 'cos', 'l2'])
def test_match_loss_equals_hand_computed(metric):
    torch.manual_seed(0)
    xr, xs = torch.rand(6, 1, 4, 4), torch.rand(3, 1, 4, 4)
    yr, ys = torch.zeros(6, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    args = SimpleNamespace(match='grad', metric=metric, bias=False, fc=False)
    loss = match_loss(TinyNet(), xr, xs, yr, ys, args)
    gr, gs = hand_grad(xr, yr, [0.5, -0.3]), hand_grad(xs, ys, [0.5, -0.3])
    d = gr - gs
    expected = {
        'mse': (d**2).sum(),
        'l1': d.abs().sum(),
        'l1_mean': d.abs().sum(),  # rows of the (2,1,1,1) weight hold one element each
        'cos': (1 - gr * gs / (gr.abs() * gs.abs() + 1e-6)).sum(),
        'l2': (d**2).sum().sqrt(),
    }[metric]
    # cos: 1 - (a value near 1) cancels in float32, hence the absolute tolerance
    # float32 against float64 (reduction order varies with the thread count); cos: 1 - (a value
    # near 1) cancels in float32, hence its absolute tolerance
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6 if metric == 'cos'
                                        else 1e-9)


def test_match_loss_fc_and_bias_add_terms():
    torch.manual_seed(0)
    xr, xs = torch.rand(4, 1, 4, 4), torch.rand(4, 1, 4, 4)
    y = torch.tensor([0, 1, 0, 1])
    base = SimpleNamespace(match='grad', metric='mse', bias=False, fc=False)
    with_fc = SimpleNamespace(match='grad', metric='mse', bias=False, fc=True)
    l0 = match_loss(TinyNet(), xr, xs, y, y, base)
    l1 = match_loss(TinyNet(), xr, xs, y, y, with_fc)
    assert l1 > l0 > 0


def test_dist_values():
    x, y = torch.tensor([[3., 0.], [0., 1.]]), torch.tensor([[0., 4.], [0., 1.]])
    assert dist(x, y, 'mse') == 25 and dist(x, y, 'l1') == 7
    assert dist(x, y, 'l1_mean') == pytest.approx(3.5)
    assert dist(x, y, 'cos').item() == pytest.approx(1.0, abs=1e-5)


def test_mix_grid_uses_nearest_resize():
    img = torch.arange(4 * 4, dtype=torch.float).view(1, 1, 4, 4).repeat(4, 1, 1, 1)
    out = mix_grid(img, 1, 2, 4)
    assert torch.equal(out[0, 0, :2, :2], img[0, 0, ::2, ::2])


# ---------------------------------------------------------------- end to end on fake data
def cli(fake_fashion, save_dir, *extra):
    return ['-d', 'fashion', '--data_dir', fake_fashion, '--ipc', '2', '-f', '2', '--niter', '1',
            '--inner_loop', '10', '--width', '0.125', '--n_data', '16', '--batch_real', '8',
            '--device', 'cpu', '--save_dir', str(save_dir), '--seed', '3', *extra]


def run(argv, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / 'condense.py'), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('device', ['cpu', CUDA])
def test_end_to_end_then_test_py_evaluates(fake_fashion, tmp_path, device):
    out = tmp_path / 'run'
    args = parse_args(cli(fake_fashion, out, '--epochs', '3', '--device', device),
                      mode='condense')
    condense.main(args)
    data, targets = safe_load(out / 'data.pt')
    assert data.shape == (20, 1, 28, 28) and targets.tolist() == sorted([*range(10)] * 2)
    for name in ('init.png', 'aug.png', 'img10.png', 'img5.png', 'args.json', 'log.txt',
                 'metrics.jsonl', 'checkpoint.pt'):
        assert (out / name).is_file(), name
    events = [json.loads(ln) for ln in open(out / 'metrics.jsonl')]
    assert {'loss', 'eval'} <= {e['event'] for e in events}
    losses = [e['loss'] for e in events if e['event'] == 'loss']
    assert len(losses) == 10 and all(np.isfinite(losses))
    # test.py reads what condense.py wrote
    from test import main as test_main
    targs = parse_args(['-d', 'fashion', '--data_dir', fake_fashion, '--ipc', '2', '-f', '2',
                        '--data_path', str(out / 'data.pt'), '--epochs', '2', '--width', '0.125',
                        '--device', device, '--save_dir', str(tmp_path / 'eval')], mode='test')
    test_main(targs)
    summary = json.load(open(tmp_path / 'eval' / 'summary.json'))
    assert summary['ipc'] == 2 and summary['factor'] == 2


def test_short_runs_and_test_flag_write_data(fake_fashion, tmp_path):
    out = tmp_path / 'one'
    argv = cli(fake_fashion, out, '--test')
    argv[argv.index('--inner_loop') + 1] = '100'  # n_iter = 1
    condense.main(parse_args(argv, mode='condense'))
    data, _ = safe_load(out / 'data.pt')
    assert data.shape == (20, 1, 28, 28)
    assert not any(json.loads(ln)['event'] == 'eval' for ln in open(out / 'metrics.jsonl'))
    assert 'Warning: --amp' not in (out / 'log.txt').read_text()


def test_condensing_with_amp_warns_in_the_log(fake_fashion, tmp_path, monkeypatch):
    # --amp runs the matching in bf16 on the CPU, 30x further from float64 than fp32: the run
    # says so and still runs (test_short_runs_and_test_flag_write_data: no warning without it);
    # on a CPU without bf16 instructions it also says that bf16 is emulated there, and slow
    import misc.device
    monkeypatch.setattr(misc.device, 'cpu_has_native_bf16', lambda: False)
    out = tmp_path / 'amp'
    argv = cli(fake_fashion, out, '--test', '--amp')
    argv[argv.index('--inner_loop') + 1] = '100'  # n_iter = 1
    condense.main(parse_args(argv, mode='condense'))
    assert safe_load(out / 'data.pt')[0].shape == (20, 1, 28, 28)
    log = (out / 'log.txt').read_text()
    assert 'Warning: --amp runs the matching in bf16' in log
    assert 'Warning: --amp on this CPU: it has no bf16 instructions' in log


def test_sigkill_or_sigterm_then_resume_matches_uninterrupted(fake_fashion, tmp_path):
    """A run killed (SIGKILL: no chance to react) or stopped (SIGTERM: kill's default, batch
    schedulers, torchrun) mid-run resumes to the data of an uninterrupted one; SIGTERM also
    exits 143 saying how to continue."""
    ref = tmp_path / 'ref'
    r = run(cli(fake_fashion, ref, '--test'))
    assert r.returncode == 0, r.stderr
    for sig in (signal.SIGKILL, signal.SIGTERM):
        cut = tmp_path / sig.name
        p = subprocess.Popen([sys.executable, str(ROOT / 'condense.py'),
                              *cli(fake_fashion, cut, '--test')], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ckpt = cut / 'checkpoint.pt'
        deadline = time.time() + 120
        while time.time() < deadline:
            if ckpt.is_file() and safe_load(ckpt)['it'] >= 3:
                break
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert safe_load(ckpt)['it'] < 10, 'the run finished before it could be killed'
        if sig == signal.SIGTERM:
            assert p.returncode == 143, err[-2000:]
            assert err.strip().splitlines()[-1] == (
                'stopped by SIGTERM: checkpoint.pt holds the last finished outer iteration; '
                'run the same command with --resume to continue')
        r = run(cli(fake_fashion, cut, '--test', '--resume'))
        assert r.returncode == 0, r.stderr
        assert 'Resumed from' in r.stdout
        a, b = safe_load(ref / 'data.pt'), safe_load(cut / 'data.pt')
        assert torch.equal(a[1], b[1])
        assert torch.allclose(a[0], b[0], atol=1e-6)


def test_resume_with_a_larger_niter_extends_the_run(fake_fashion, tmp_path, capsys):
    """A finished run resumed with a larger --niter continues to the data of a run started
    with that --niter; a --niter below what the checkpoint has done is refused (exit 2)."""
    def argv(out, niter, *extra):
        # two classes only: at least 100 inner steps per --niter, kept cheap
        a = cli(fake_fashion, out, '--test', '--nclass_sub', '2', '--phase', '0', *extra)
        a[a.index('--inner_loop') + 1] = '50'  # 2 outer iterations per 100 inner steps
        a[a.index('--niter') + 1] = str(niter)
        return a
    condense.main(parse_args(argv(tmp_path / 'ref', 2), mode='condense'))
    ext = tmp_path / 'ext'
    condense.main(parse_args(argv(ext, 1), mode='condense'))
    assert safe_load(ext / 'checkpoint.pt')['it'] == 2
    capsys.readouterr()
    condense.main(parse_args(argv(ext, 2, '--resume'), mode='condense'))
    out = capsys.readouterr().out
    assert 'at outer iteration 2/4' in out and '--niter 1 -> 2' in out
    a, b = safe_load(tmp_path / 'ref' / 'data.pt'), safe_load(ext / 'data.pt')
    assert safe_load(ext / 'checkpoint.pt')['it'] == 4
    assert torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-6)
    before = (ext / 'args.json').read_text()
    r = run(argv(ext, 1, '--resume'))
    assert r.returncode == 2
    assert 'has done 4 outer iterations (--niter 2), more than the 2 of --niter 1' in r.stderr
    assert 'resume with --niter 2 or more' in r.stderr
    assert (ext / 'args.json').read_text() == before


def test_resume_without_checkpoint_starts_afresh(fake_fashion, tmp_path):
    out = tmp_path / 'fresh'
    argv = cli(fake_fashion, out, '--test', '--resume')
    argv[argv.index('--inner_loop') + 1] = '100'
    r = run(argv)
    assert r.returncode == 0, r.stderr
    assert 'starting afresh' in r.stdout
    assert 'to extend a run' not in r.stdout  # said only when --niter is given, below


def test_resume_into_a_default_folder_of_another_niter_says_why_it_starts_afresh(
        fake_fashion, tmp_path, capsys):
    argv = cli(fake_fashion, tmp_path, '--resume', '--nclass_sub', '2', '--phase', '0',
               '--epochs', '1')
    argv[argv.index('--inner_loop') + 1] = '100'
    del argv[argv.index('--save_dir'):argv.index('--save_dir') + 2]
    args = parse_args(argv, mode='condense')
    assert 'save_dir' not in args.explicit and '_niter1_' in args.save_dir
    args.save_dir = str(tmp_path / 'default')  # the default folder, kept out of ./results
    condense.main(args)
    out = capsys.readouterr().out
    assert 'starting afresh' in out and 'give that run\'s --save_dir' in out


@pytest.mark.parametrize('extra, message', [
    (['--ipc', '0'], '--ipc must be at least 1'),
    (['-f', '0'], '--factor must be at least 1'),
    (['-f', '30'], 'larger than the image side'),
    (['--niter', '0'], '--niter must be at least 1'),
    (['--inner_loop', '0'], '--inner_loop must be at least 1'),
    (['--batch_syn_max', '0'], '--batch_syn_max must be at least 1'),
    (['--inner_loop', '1000'], 'gives no outer iteration'),
    (['--pt_from', '2'], 'no pretrained networks'),
    (['--pt_from', '2'], 'python train.py -d fashion -n convnet --depth 3 --norm_type instance '
                         '--width 0.125 --pt_from 2 --pt_num 1'),
    # values torch, numpy or the models would refuse only after the folder was written
    (['--lr', '-0.1'], '--lr must not be negative'),
    (['--mom_img', '-1'], '--mom_img must not be negative'),
    (['--beta', '0'], '--beta'),
    (['--aug_type', 'color_foo'], "--aug_type: unknown augmentation(s) ['foo']"),
    (['-n', 'resnet', '--depth', '7'], 'cannot build the network ResNet-7'),
    (['--norm_type', 'sn'], 'cannot build the network'),
    (['--width', '0.001'], 'leaves ConvNet no channel'),
    (['-n', 'resnet_ap', '--match', 'feat', '--f_idx', '9'], "--f_idx '9' selects no layer"),
    (['--match', 'feat', '--f_idx', '2,1'], 'must not come after'),
    # 20 real images per class: --init mix with ipc 6 and factor 2 needs 24
    (['--ipc', '6'], '--init mix needs 24 real images of each class (ipc 6 x factor^2 4), but '
                     'class 0 has 20'),
])
def test_bad_input_exits_2_and_writes_nothing(fake_fashion, tmp_path, extra, message, capsys):
    out = tmp_path / 'bad'
    with pytest.raises(SystemExit) as e:
        condense.run_cli(cli(fake_fashion, out) + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_a_finished_run_is_not_overwritten_without_resume(fake_fashion, tmp_path, capsys):
    out = tmp_path / 'done'
    out.mkdir()
    (out / 'checkpoint.pt').write_bytes(b'the earlier run')
    (out / 'data.pt').write_bytes(b'its data')
    with pytest.raises(SystemExit) as e:
        condense.run_cli(cli(fake_fashion, out))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'already holds a run' in err and 'Add --resume to continue it' in err
    assert sorted(os.listdir(out)) == ['checkpoint.pt', 'data.pt']
    assert (out / 'data.pt').read_bytes() == b'its data'


def test_ctrl_c_exits_130_with_the_resume_hint(fake_fashion, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(condense, 'condense', interrupted)
    with pytest.raises(SystemExit) as e:
        condense.run_cli(cli(fake_fashion, tmp_path / 'c'))
    assert e.value.code == 130
    assert 'run the same command with --resume' in capsys.readouterr().err


def test_the_pretrain_hint_names_the_folder_condense_reads(fake_fashion, tmp_path):
    """The train.py command in the --pt_from error writes where condense.py looks."""
    import fnmatch
    import train
    args = parse_args(cli(fake_fashion, tmp_path / 'c', '--pt_from', '2'), mode='condense')
    hint = condense.pretrain_command(args).split()
    assert hint[:2] == ['python', 'train.py']
    targs = parse_args(hint[2:] + ['--data_dir', fake_fashion], mode='train')
    pattern = f'./pretrained/{args.datatag}/{args.modeltag}_cut*'
    assert fnmatch.fnmatch(train.output_dir(targs), pattern)


def test_resume_with_other_configuration_is_refused(fake_fashion, tmp_path):
    out = tmp_path / 'conf'
    argv = cli(fake_fashion, out, '--test')
    argv[argv.index('--inner_loop') + 1] = '100'
    assert run(argv).returncode == 0
    before = (out / 'args.json').read_text()
    r = run(argv + ['--resume', '--lr_img', '0.5'])
    assert r.returncode == 2 and 'different configuration' in r.stderr
    assert (out / 'args.json').read_text() == before


def test_missing_dataset_exits_2(tmp_path):
    out = tmp_path / 'nodata'
    r = run(cli(str(tmp_path / 'none'), out))
    assert r.returncode == 2 and 'FashionMNIST not found' in r.stderr
    assert not out.exists()


def test_pretrained_networks_are_loaded(fake_fashion, tmp_path, monkeypatch):
    # a train.py-style checkpoint with the original's key layout ('state_dict', 'module.')
    from models import get_model
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / 'pretrained' / 'fashion' / 'conv3in_w0.125_cut_seed0'
    folder.mkdir(parents=True)
    net = get_model('convnet', 10, 1, 28, 3, 0.125)
    torch.save({'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}},
               folder / 'checkpoint4.pth.tar')
    out = tmp_path / 'pt'
    argv = cli(fake_fashion, out, '--test', '--pt_from', '4')
    argv[argv.index('--inner_loop') + 1] = '100'
    condense.main(parse_args(argv, mode='condense'))
    assert (out / 'data.pt').is_file()
    # a checkpoint of another architecture is refused clearly
    wrong = get_model('convnet', 10, 1, 28, 2, 0.125)
    torch.save(wrong.state_dict(), folder / 'checkpoint4.pth.tar')
    r = subprocess.run([sys.executable, str(ROOT / 'condense.py'),
                        *cli(fake_fashion, tmp_path / 'pt2', '--test', '--pt_from', '4')],
                       cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 2 and 'checkpoint4.pth.tar' in r.stderr


# ---------------------------------------------------------------- fast path = the original's math
def _state(fake_fashion, ipc, factor, seed=0, device='cpu', **kw):

    from data import ClassSampler, DATASETS, load_split, stream_generator
    from misc.augment import build_match_aug
    from models import get_model
    line = (f'-d fashion --data_dir {fake_fashion} --ipc {ipc} -f {factor} --device {device} '
            f'--batch_real 8 --width 0.125 --seed {seed}')
    for k, v in kw.items():
        line += f' --{k} {v}'
    args = parse_args(line.split(), mode='condense')
    torch.manual_seed(seed)
    sampler = ClassSampler(load_split(args), args.batch_real, device, seed=seed)
    syn = Synthesizer(range(10), ipc, 1, 28, factor, device=device)
    syn.init(sampler, args.init)
    model = get_model('convnet', 10, 1, 28, 3, 0.125).to(device)
    opt = torch.optim.SGD([syn.data], lr=0.1, momentum=args.mom_img)
    gens = {c: stream_generator(seed, 100 + c) for c in range(10)}
    info = DATASETS['fashion']
    aug = build_match_aug(args.aug_type, info.mean, info.std)
    return dict(args=args, sampler=sampler, syn=syn, model=model, opt=opt, gens=gens, aug=aug)


@pytest.mark.parametrize('ipc, factor, kw', [(2, 2, {}), (1, 3, {'metric': 'mse'}),
                                             (3, 1, {'metric': 'cos', 'batch_syn_max': 2})])
def test_fast_match_step_equals_per_class_loop(fake_fashion, ipc, factor, kw):
    import contextlib
    runs = []
    for step in (condense.match_step_loop, condense.match_step):
        st = _state(fake_fashion, ipc, factor, **kw)
        losses = [step(st['args'], st['syn'], st['sampler'], st['model'], st['opt'], st['aug'],
                       st['gens'], contextlib.nullcontext()) for _ in range(3)]
        runs.append((losses, st['syn'].data.detach().clone(),
                     st['opt'].state[st['syn'].data]['momentum_buffer'].clone()))
    (l0, s0, b0), (l1, s1, b1) = runs
    assert l0 == pytest.approx(l1, rel=1e-4)
    assert torch.allclose(b0, b1, rtol=1e-4, atol=1e-5)
    # float32 rounding of the closed form: S values reach ~4 here
    assert torch.allclose(s0, s1, rtol=1e-5, atol=1e-5)
    assert (b0.abs() > 0).float().mean() > 0.5  # the steps did move S


def test_momentum_closed_form_matches_sgd():
    torch.manual_seed(0)
    p = torch.randn(6, 2, requires_grad=True)
    buf0 = torch.randn(6, 2)
    grads = torch.randn(3, 6, 2)
    opt = torch.optim.SGD([p], lr=0.3, momentum=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()  # creates the buffer; then overwrite it with buf0 and restore p
    opt.state[p]['momentum_buffer'] = buf0.clone()
    start = torch.randn(6, 2)
    with torch.no_grad():
        p.copy_(start)
    pos = torch.tensor([0, 0, 1, 1, 2, 2])
    for k in range(3):  # step k carries the gradient of row block k only
        g = torch.zeros(6, 2)
        g[2 * k:2 * k + 2] = grads[k, 2 * k:2 * k + 2]
        p.grad = g
        opt.step()
    g_own = torch.cat([grads[k, 2 * k:2 * k + 2] for k in range(3)])
    q, b = condense.momentum_closed_form(start, buf0, g_own, pos, 3, 0.3, 0.5)
    assert torch.allclose(q, p.detach(), atol=1e-6)
    assert torch.allclose(b, opt.state[p]['momentum_buffer'], atol=1e-6)
