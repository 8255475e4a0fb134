"""train.py: the shared training loop, checkpoints, resume, and the full-data script."""
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from argument import parse_args
from conftest import ROOT
from misc.utils import Logger, UserError
from models import get_model

SMALL = ['--width', '0.125', '--device', 'cpu']


def fashion_args(data_dir, save_dir, *extra):
    return parse_args(['-d', 'fashion', '--data_dir', str(data_dir), '--save_dir', str(save_dir),
                       *SMALL, *extra], mode='train')


def tiny_convnet(nclass=10):
    return get_model('convnet', nclass, nch=1, size=28, depth=3, width=0.125, dataset='fashion')


def endless(batch=32, nclass=10):
    while True:
        yield torch.rand(batch, 1, 28, 28), torch.randint(nclass, (batch,))


# ------------------------------------------------------------------------------- loop functions
def test_train_epoch_stops_after_n_data_with_cutmix_and_aug():
    model = tiny_convnet()
    opt = torch.optim.SGD(model.parameters(), 0.01)
    calls = []

    def aug(x):
        calls.append(torch.is_grad_enabled())
        return x * 2 - 1

    before = [p.detach().clone() for p in model.parameters()]
    out = train.train_epoch(model, endless(), opt, aug=aug, mixup='cut', beta=1.0, mix_p=1.0,
                            n_data=100)
    assert len(calls) == 4 and not any(calls)  # ceil(100 / 32) batches, aug without grad
    assert set(out) >= {'loss', 'top1'} and out['loss'] > 0 and 0 <= out['top1'] <= 100
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_epoch_nan_loss_is_a_user_error():
    model = tiny_convnet()
    opt = torch.optim.SGD(model.parameters(), 0.01)
    bad = [(torch.full((4, 1, 28, 28), float('nan')), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(UserError, match='loss became nan'):
        train.train_epoch(model, bad, opt)


def test_validate_counts_top1_top5():

    class Fixed(nn.Module):
        def forward(self, x):  # logits ranking class k first for every input
            return torch.arange(10.0).flip(0).expand(len(x), 10)

    y = torch.tensor([0, 0, 3, 9])  # class 0 is top-1, classes 0..4 are top-5
    res = train.validate(Fixed(), [(torch.zeros(4, 1), y)])
    assert res['top1'] == pytest.approx(50.0) and res['top5'] == pytest.approx(75.0)
    assert res['loss'] > 0


def test_train_model_schedule_and_validation_points():
    args = parse_args(['-d', 'fashion', '--epochs', '12'], mode='train')
    model = tiny_convnet()
    data = [(torch.rand(8, 1, 28, 28), torch.arange(8) % 10)]
    lrs = []

    def record(state, is_best):
        lrs.append(state['optimizer']['param_groups'][0]['lr'])

    res = train.train_model(args, model, data, data, 'cpu', Logger(None), 12, num_val=4,
                            on_epoch_end=record)
    assert [h['epoch'] for h in res['history']] == [3, 6, 9, 12]
    # MultiStepLR at 2/3 (8) and 5/6 (10) of 12 epochs, gamma 0.2 (lr after each epoch's step)
    assert lrs[6] == pytest.approx(0.01) and lrs[7] == pytest.approx(0.002)
    assert lrs[9] == pytest.approx(0.0004) and lrs[11] == pytest.approx(0.0004)
    assert res['best'] == max(h['top1'] for h in res['history'])
    assert res['last'] == res['history'][-1]['top1']


# ------------------------------------------------------------------------------- load_weights
def test_load_weights_formats(tmp_path):
    src = tiny_convnet()
    sd = src.state_dict()
    formats = {
        'raw.pt': sd,
        'original.pth.tar': {'epoch': 3, 'arch': 'convnet', 'best_acc1': 50.0,
                             'state_dict': {f'module.{k}': v for k, v in sd.items()}},
        'model.pt': {'model': sd, 'epoch': 1},
    }
    for name, obj in formats.items():
        torch.save(obj, tmp_path / name)
        dst = tiny_convnet()
        train.load_weights(dst, tmp_path / name)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)


def test_load_weights_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match='not found'):
        train.load_weights(tiny_convnet(), tmp_path / 'none.pth.tar')
    torch.save(tiny_convnet().state_dict(), tmp_path / 'w.pt')
    wide = get_model('convnet', 10, nch=1, size=28, depth=3, width=0.25, dataset='fashion')
    with pytest.raises(UserError, match=r'w\.pt.*another shape'):
        train.load_weights(wide, tmp_path / 'w.pt')
    deep = get_model('convnet', 10, nch=1, size=28, depth=4, width=0.125, dataset='fashion')
    with pytest.raises(UserError, match='missing'):
        train.load_weights(deep, tmp_path / 'w.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'w.pt').read_bytes()[:200])
    with pytest.raises(UserError, match='cut.pt'):
        train.load_weights(tiny_convnet(), tmp_path / 'cut.pt')
    torch.save({'epoch': 3}, tmp_path / 'noweights.pt')
    with pytest.raises(UserError, match='no network weights'):
        train.load_weights(tiny_convnet(), tmp_path / 'noweights.pt')


# ------------------------------------------------------------------------------- train.py main
def test_main_full_training_writes_checkpoints_and_summary(fake_fashion, tmp_path, capsys):
    out = tmp_path / 'run'
    summary = train.main(fashion_args(fake_fashion, out, '--epochs', '3', '--save_ckpt', 'true'))
    printed = capsys.readouterr().out
    assert re.search(r'^Repeat 1 => Best, last acc: \d+\.\d \d+\.\d$', printed, re.M)
    assert printed.count('(Test) Top1') == 3  # full-data runs validate every epoch
    s = json.loads((out / 'summary.json').read_text())
    assert s['selection'] == 'full' and s['epochs'] == 3 and s['n_train'] == 200
    assert len(s['runs']) == 1 and s['best_mean'] == summary['best_mean']
    assert s['best_mean'] >= s['last_mean'] and s['best_std'] == 0
    assert json.loads((out / 'args.json').read_text())['epochs'] == 3
    ckpt = torch.load(out / 'checkpoint.pth.tar', weights_only=True)
    assert {'model', 'optimizer', 'scheduler', 'epoch', 'result', 'args', 'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 3 and ckpt['result']['best'] == s['runs'][0]['best']
    assert ckpt['scheduler']['last_epoch'] == 3
    best = torch.load(out / 'model_best.pth.tar', weights_only=True)
    assert best['best_acc1'] == s['best_mean']
    train.load_weights(tiny_convnet(), out / 'model_best.pth.tar')
    lines = [json.loads(ln) for ln in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in lines if r.get('event') == 'val'] == [1, 2, 3]
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


class Interrupt(Exception):
    pass


def die_in_epoch(monkeypatch, n):
    """Make the n-th training epoch from now raise Interrupt; returns the real train_epoch."""
    real_epoch, calls = train.train_epoch, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise Interrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(train, 'train_epoch', dies)
    return real_epoch


def test_resume_finishes_an_interrupted_run_identically(fake_fashion, tmp_path, monkeypatch):
    opts = ('--epochs', '3', '--repeat', '2', '--save_ckpt', 'true')
    ref = train.main(fashion_args(fake_fashion, tmp_path / 'ref', *opts))

    real_epoch = die_in_epoch(monkeypatch, 5)  # repeat 2, epoch 2
    with pytest.raises(Interrupt):
        train.main(fashion_args(fake_fashion, tmp_path / 'cut', *opts))
    ckpt = torch.load(tmp_path / 'cut' / 'checkpoint.pth.tar', weights_only=True)
    assert (ckpt['repeat'], ckpt['epoch'], len(ckpt['finished'])) == (1, 1, 1)
    assert not (tmp_path / 'cut' / 'summary.json').exists()

    monkeypatch.setattr(train, 'train_epoch', real_epoch)
    resumed = train.main(fashion_args(fake_fashion, tmp_path / 'cut', *opts, '--resume'))
    assert resumed['runs'] == ref['runs']  # same schedule, same random draws
    # a finished run resumes to the same summary
    again = train.main(fashion_args(fake_fashion, tmp_path / 'cut', *opts, '--resume'))
    assert again['runs'] == ref['runs']
    with pytest.raises(UserError, match='other settings.*epochs'):
        train.main(fashion_args(fake_fashion, tmp_path / 'cut', '--epochs', '4', '--repeat', '2',
                                '--resume'))


def test_resume_from_a_checkpoint_of_the_original_code(fake_fashion, tmp_path, capsys):
    model = tiny_convnet()
    opt = torch.optim.SGD(model.parameters(), 0.01, momentum=0.9, weight_decay=5e-4)
    os.makedirs(tmp_path / 'orig')
    torch.save({'epoch': 2, 'arch': 'convnet', 'best_acc1': 12.0, 'best_acc5': 50.0,
                'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                'optimizer': opt.state_dict()}, tmp_path / 'orig' / 'checkpoint.pth.tar')
    s = train.main(fashion_args(fake_fashion, tmp_path / 'orig', '--epochs', '3', '--resume'))
    out = capsys.readouterr().out
    assert 'checkpoint of the original code' in out and out.count('(Test) Top1') == 1
    assert s['runs'][0]['best'] >= 12.0
    ckpt = torch.load(tmp_path / 'orig' / 'checkpoint.pth.tar', weights_only=True)
    # milestones 2 and 2 (2/3 and 5/6 of 3 epochs): lr 0.01 * 0.2^2 after the replayed epochs
    assert ckpt['epoch'] == 3 and ckpt['scheduler']['last_epoch'] == 3
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.0004)


def test_pt_from_writes_per_epoch_networks_for_condensation(fake_fashion, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(['-d', 'fashion', '--data_dir', str(fake_fashion), *SMALL, '--epochs', '3',
                       '--pt_from', '2', '--pt_num', '2'], mode='train')
    train.main(args)
    folder = tmp_path / 'pretrained' / 'fashion' / 'conv3in_w0.125_cut_0'  # condense.py's glob
    assert sorted(p.name for p in folder.glob('checkpoint[0-9]*.pth.tar')) == \
        ['checkpoint2.pth.tar', 'checkpoint3.pth.tar']
    ck = torch.load(folder / 'checkpoint2.pth.tar', weights_only=True)
    assert ck['epoch'] == 2
    train.load_weights(tiny_convnet(), folder / 'checkpoint3.pth.tar')
    with pytest.raises(UserError, match='--seed'):
        train.main(parse_args(['-d', 'fashion', '--pt_from', '2', '--repeat', '2'], mode='train'))


@pytest.mark.parametrize('dataset, extra, net', [
    ('cifar100', ['--skip_checksum'], 'ConvNet-3-IN-w0.125'),
    ('svhn', ['--skip_checksum', '-n', 'resnet', '--depth', '10', '--norm_type', 'batch'],
     'ResNet-10-BN'),
    ('mnist', [], 'ConvNet-3-IN-w0.125'),
    ('imagenet', ['--nclass', '4', '--size', '32'], 'ResNetAP-10-IN-w0.125'),  # no DSA
])
def test_main_on_other_datasets(fake_root, tmp_path, dataset, extra, net):
    a = parse_args(['-d', dataset, '--data_dir', str(fake_root), '--imagenet_dir',
                    str(fake_root / 'imagenet'), '--save_dir', str(tmp_path), *SMALL,
                    '--epochs', '1', *extra], mode='train')
    assert a.dsa == (dataset != 'imagenet')
    s = train.main(a)
    saved = json.loads((tmp_path / 'summary.json').read_text())
    assert saved['evaluator'] == net and len(s['runs']) == 1
    assert 0 <= saved['runs'][0]['last'] <= 100


def test_resume_from_a_broken_checkpoint_is_a_user_error(fake_fashion, tmp_path):
    os.makedirs(tmp_path / 'r')
    (tmp_path / 'r' / 'checkpoint.pth.tar').write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(UserError, match='checkpoint.pth.tar: cannot be read'):
        train.main(fashion_args(fake_fashion, tmp_path / 'r', '--epochs', '2', '--resume'))


def test_cli_errors_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '-d', 'fashion', '--data_dir',
                        str(tmp_path / 'nowhere'), '--save_dir', str(tmp_path / 'o'), '--device',
                        'cpu'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith('error: FashionMNIST not found') and 'Traceback' not in r.stderr
    assert not (tmp_path / 'o').exists()  # nothing half-written


def test_refused_input_leaves_the_folder_as_it_was(fake_fashion, tmp_path):
    opts = ('--epochs', '1', '--save_ckpt', 'true')
    train.main(fashion_args(fake_fashion, tmp_path / 'r', *opts))
    before = {p.name: p.read_bytes() for p in (tmp_path / 'r').iterdir()}
    # a resume with other settings is refused, and the run's args.json keeps its settings
    with pytest.raises(UserError, match='other settings'):
        train.main(fashion_args(fake_fashion, tmp_path / 'r', *opts, '--resume', '--lr', '0.05'))
    assert {p.name: p.read_bytes() for p in (tmp_path / 'r').iterdir()} == before
    # the network weights train.py writes are not a state to resume
    os.replace(tmp_path / 'r' / 'model_best.pth.tar', tmp_path / 'r' / 'checkpoint.pth.tar')
    with pytest.raises(UserError, match='network weights only'):
        train.main(fashion_args(fake_fashion, tmp_path / 'r', *opts, '--resume'))
    # nor is a checkpoint that lacks entries a resume needs
    ckpt = torch.load(tmp_path / 'r' / 'checkpoint.pth.tar', weights_only=True)
    torch.save({'epoch': 1, 'repeat': 0, 'model': ckpt['state_dict'], 'args': ckpt['args']},
               tmp_path / 'r' / 'checkpoint.pth.tar')
    with pytest.raises(UserError, match='not a train.py checkpoint.*result'):
        train.main(fashion_args(fake_fashion, tmp_path / 'r', *opts, '--resume'))


def test_every_run_can_resume_and_is_not_overwritten(fake_fashion, tmp_path, monkeypatch):
    # no --save_ckpt: the resume state is written anyway, after every epoch
    real_epoch = die_in_epoch(monkeypatch, 2)
    with pytest.raises(Interrupt):
        train.main(fashion_args(fake_fashion, tmp_path / 'k', '--epochs', '2'))
    monkeypatch.setattr(train, 'train_epoch', real_epoch)
    ckpt = torch.load(tmp_path / 'k' / 'checkpoint.pth.tar', weights_only=True)
    assert ckpt['epoch'] == 1
    assert not (tmp_path / 'k' / 'model_best.pth.tar').exists()  # that one needs --save_ckpt
    # the same command without --resume would start over: refused, the checkpoint kept
    with pytest.raises(UserError, match='already holds a run.*--resume'):
        train.main(fashion_args(fake_fashion, tmp_path / 'k', '--epochs', '2'))
    assert torch.load(tmp_path / 'k' / 'checkpoint.pth.tar', weights_only=True)['epoch'] == 1
    s = train.main(fashion_args(fake_fashion, tmp_path / 'k', '--epochs', '2', '--resume'))
    assert len(s['runs']) == 1
    assert json.loads((tmp_path / 'k' / 'summary.json').read_text())['epochs'] == 2


def test_the_setup_check_leaves_the_random_draws_alone(fake_fashion, tmp_path):
    # same seed, same run: building the network once to check the options draws nothing
    from misc.utils import set_seed
    args = parse_args(['-d', 'fashion', '--data_dir', str(fake_fashion), '--match', 'feat',
                       '--ipc', '1', *SMALL], mode='condense')
    set_seed(0)
    train.check_setup(args, match=True)
    after = (torch.rand(4), np.random.rand(), random.random())
    set_seed(0)
    before = (torch.rand(4), np.random.rand(), random.random())
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]


@pytest.mark.parametrize('extra, message', [
    (['--pt_from', '0'], '--pt_from is an epoch, 1 or more'),
    (['--epochs', '3', '--pt_from', '3', '--pt_num', '2'], 'would never be saved'),
    (['--wd', '-1'], '--wd must not be negative'),
    (['--dsa_strategy', 'color_spin'], "--dsa_strategy: unknown augmentation(s) ['spin']"),
    (['-n', 'resnet', '--depth', '7'], 'cannot build the network'),
])
def test_bad_options_exit_2_and_write_nothing(fake_fashion, tmp_path, extra, message):
    r = subprocess.run([sys.executable, str(ROOT / 'train.py'), '-d', 'fashion', '--data_dir',
                        str(fake_fashion), '--save_dir', str(tmp_path / 'o'), *SMALL, *extra],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert message in r.stderr
    assert not (tmp_path / 'o').exists()


def test_train_epoch_reports_the_sample_weighted_means():
    # the sums are kept on the device and read once: the same means as batch by batch
    torch.manual_seed(0)
    model = tiny_convnet()
    opt = torch.optim.SGD(model.parameters(), 0.0)  # the network stays as it is
    batches = [(torch.rand(n, 1, 28, 28), torch.randint(10, (n, ))) for n in (5, 3, 8)]
    out = train.train_epoch(model, batches, opt)
    model.train()
    with torch.no_grad():
        logits = [model(x) for x, _ in batches]
    ys = torch.cat([y for _, y in batches])
    loss = sum(F.cross_entropy(lg, y) * len(y) for lg, (_, y) in zip(logits, batches)) / len(ys)
    top1 = (torch.cat(logits).argmax(1) == ys).float().mean() * 100
    assert out['loss'] == pytest.approx(loss.item(), rel=1e-5)
    assert out['top1'] == pytest.approx(top1.item())


def test_a_nan_loss_stops_the_epoch_within_20_batches():
    model = tiny_convnet()
    opt = torch.optim.SGD(model.parameters(), 0.01)
    drawn = []

    def batches():
        for i in range(100):
            drawn.append(i)
            x = torch.full((2, 1, 28, 28), float('nan') if i == 3 else 0.5)
            yield x, torch.zeros(2, dtype=torch.long)
    with pytest.raises(UserError, match='loss became nan'):
        train.train_epoch(model, batches(), opt)
    assert len(drawn) == 20



class _Said(list):
    """A logger that keeps its lines (train_model's logger(...) and logger.json(...))."""
    def __call__(self, msg=''):
        self.append(msg)

    def json(self, record):
        pass


def test_train_model_compiled_steps_and_validation_follow_the_eager_run(monkeypatch):
    # step_kind 'compile' (the CPU default for long runs): the loss through torch.compile and
    # the validation's forward pass compiled (CompiledForward); the history follows the eager
    # run's, and neither fell back to eager computation.
    args = parse_args(['-d', 'fashion', '--epochs', '4'], mode='train')
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(8, 1, 28, 28, generator=g), torch.arange(8) % 10)]
    val = [(torch.rand(12, 1, 28, 28, generator=g), torch.arange(12) % 10)]
    compiled_passes = []
    real_forward = train.CompiledForward.__call__

    def counted(self, model, x):
        out = real_forward(self, model, x)
        compiled_passes.append(out is not None)
        return out
    monkeypatch.setattr(train.CompiledForward, '__call__', counted)
    runs = []
    for kind in (None, 'compile'):
        torch.manual_seed(3)
        said = _Said()
        runs.append(train.train_model(args, tiny_convnet(), data, val, 'cpu', said, 4, num_val=2,
                                      step_kind=kind))
        assert not [m for m in said if 'warning' in m]
    assert compiled_passes == [True, True]  # the two validations of the compiled run
    (a, b) = runs
    for ha, hb in zip(a['history'], b['history']):
        assert hb['loss'] == pytest.approx(ha['loss'], rel=1e-4)
        assert hb['train_loss'] == pytest.approx(ha['train_loss'], rel=1e-4)
