"""test.py: every selection type, every evaluator, the summary, and bad inputs."""
import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import test as evaltest
import train
from argument import parse_args
from conftest import ROOT
from data import DATASETS, load_split
from misc.utils import Logger, UserError

assert os.path.samefile(evaltest.__file__, ROOT / 'test.py')  # not the standard library's `test`

SMALL = ['--width', '0.125', '--device', 'cpu']
FASHION_PUBLISHED = 'results/fashion/conv3in_grad_l1_nd500_cut_niter2000_factor2_lr0.0001_mix_ipc2'
SUMMARY_LINE = re.compile(r'^Repeat (\d+) => Best, last acc: (\d+\.\d) (\d+\.\d)$', re.M)


def targs(data_dir, *extra, dataset='fashion'):
    return parse_args(['-d', dataset, '--data_dir', str(data_dir), *SMALL, *extra], mode='test')


def condensed(path, n_per_class=2, nclass=10, shape=(1, 28, 28), seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(n_per_class * nclass, *shape, generator=g)
    if labels is None:
        labels = torch.arange(nclass).repeat_interleave(n_per_class)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save([data, labels], path)
    return data, labels


@pytest.fixture
def captured(monkeypatch):
    """Replace the training by a record of what it would train on."""
    seen = {}

    def fake_evaluate(args, images, targets, val_loader, device, logger, evaluators=None,
                      repeat=None, tag=''):
        seen.update(images=images.cpu(), targets=targets.cpu(), args=args,
                    evaluators=evaluators)
        ev = evaluators[0]
        run = dict(best=50.0, last=40.0, best5=90.0, last5=80.0)
        return {ev.name: dict(evaluator=ev.name, epochs=ev.epochs or evaltest.eval_epochs(args),
                              repeat=args.repeat, **train.summarize([run]))}

    monkeypatch.setattr(evaltest, 'evaluate_data', fake_evaluate)
    return seen


# ------------------------------------------------------------------------------- idc
def test_idc_data_path_trains_and_summarizes_beside_the_data(fake_fashion, tmp_path, capsys):
    data, _ = condensed(str(tmp_path / 'run' / 'data.pt'))
    (tmp_path / 'run' / 'args.json').write_text('{"from": "condense"}')
    s = evaltest.main(targs(fake_fashion, '--data_path', str(tmp_path / 'run' / 'data.pt'),
                            '--ipc', '2', '-f', '2', '--epochs', '4', '--repeat', '2'))
    out = capsys.readouterr().out
    lines = SUMMARY_LINE.findall(out)
    assert len(lines) == 1 and lines[0][0] == '2'
    assert float(lines[0][1]) == pytest.approx(s['best_mean'], abs=0.05)
    run = tmp_path / 'run'
    for name in ('summary.json', 'test.png', 'log.txt', 'metrics.jsonl', 'test_args.json'):
        assert (run / name).is_file(), name
    assert json.loads((run / 'args.json').read_text()) == {'from': 'condense'}  # kept
    summary = json.loads((run / 'summary.json').read_text())
    assert (summary['dataset'], summary['selection'], summary['ipc'], summary['factor']) == \
        ('fashion', 'idc', 2, 2)
    assert summary['evaluator'] == 'ConvNet-3-IN-w0.125' and summary['epochs'] == 4
    assert summary['repeat'] == 2 and len(summary['runs']) == 2
    assert summary['n_train'] == 10 * 2 * 4  # decoded: f^2 crops per stored image
    best = [r['best'] for r in summary['runs']]
    last = [r['last'] for r in summary['runs']]
    assert summary['best_mean'] == pytest.approx(np.mean(best))
    assert summary['best_std'] == pytest.approx(np.std(best))
    assert summary['last_mean'] == pytest.approx(np.mean(last))
    assert summary['last_std'] == pytest.approx(np.std(last))
    assert [r['evaluator'] for r in summary['results']] == ['ConvNet-3-IN-w0.125']
    assert 'Repeat 2 => Best, last acc:' in (run / 'log.txt').read_text()
    assert 'test.png' in os.listdir(run) and (run / 'test.png').stat().st_size > 100


def test_idc_name_published_folder_and_save_dir(fake_fashion, tmp_path, monkeypatch, captured):
    monkeypatch.chdir(tmp_path)
    data, labels = condensed(f'{FASHION_PUBLISHED}/data.pt')
    evaltest.main(targs(fake_fashion, '--ipc', '2', '-f', '2'))
    assert (tmp_path / FASHION_PUBLISHED / 'summary.json').is_file()
    assert captured['images'].shape == (80, 1, 28, 28)
    assert captured['args'].epochs == 1000  # the protocol's epochs for condensed data
    # the first decoded image of class 0 is the top-left crop of the first stored image
    crop = torch.nn.functional.interpolate(data[:1, :, :14, :14], size=(28, 28),
                                           mode='bilinear', align_corners=False)
    assert torch.allclose(captured['images'][0], crop[0], atol=1e-6)

    condensed('results/mine/x_ipc3/data.pt', n_per_class=3, seed=1)
    evaltest.main(targs(fake_fashion, '--ipc', '3', '--name', 'mine/x', '--save_dir',
                        str(tmp_path / 'elsewhere')))
    assert captured['images'].shape == (30, 1, 28, 28)
    assert (tmp_path / 'elsewhere' / 'summary.json').is_file()
    assert (tmp_path / 'elsewhere' / 'args.json').is_file()
    assert not (tmp_path / 'results' / 'mine' / 'x_ipc3' / 'summary.json').exists()


@pytest.mark.parametrize('line, folder', [
    ('-d cifar10 -f 2 --ipc 10', 'cifar10/conv3in_grad_mse_nd2000_cut_niter2000_factor2_lr0.005_mix'),
    ('-d cifar100 -f 2 --ipc 10',
     'cifar100/conv3in_grad_mse_nd2000_cut_niter2000_factor2_lr0.005_mix'),
    ('-d svhn -f 1 --ipc 1', 'svhn/conv3in_grad_mse_nd500_cut_niter2000_factor1_lr0.005_random'),
    ('-d fashion -f 2 --ipc 10',
     'fashion/conv3in_grad_l1_nd500_cut_niter2000_factor2_lr0.0001_mix'),
    ('-d mnist -f 2 --ipc 10',
     'mnist/conv3in_grad_l1_nd500_niter2000_factor2_color_crop_lr0.0001_mix'),
    ('-d imagenet --nclass 10 -f 3 --ipc 10',
     'imagenet10/resnet10apin_grad_l1_ely10_nd500_cut_factor3_mix'),
])
def test_published_folder_is_the_originals_without_reproduce(line, folder):
    # the downloads' folders, found with the plain options (no --reproduce, no --name)
    args = parse_args(line.split(), mode='test')
    assert evaltest.published_folder(args) == os.path.join(evaltest.RESULTS, f'{folder}_ipc'
                                                           f'{args.ipc}')


@pytest.mark.parametrize('decode_type, n', [('single', 80), ('bound', 80), ('multi', 100)])
def test_decode_types(fake_fashion, tmp_path, captured, decode_type, n):
    condensed(str(tmp_path / 'data.pt'))
    evaltest.main(targs(fake_fashion, '--data_path', str(tmp_path / 'data.pt'), '--ipc', '2',
                        '-f', '2', '--decode_type', decode_type))
    assert captured['images'].shape[0] == n
    assert torch.equal(captured['targets'][:n // 10], torch.zeros(n // 10, dtype=torch.long))


def test_data_path_without_ipc_and_same_compute(fake_fashion, tmp_path, captured):
    condensed(str(tmp_path / 'data.pt'), n_per_class=3)
    s = evaltest.main(targs(fake_fashion, '--data_path', str(tmp_path / 'data.pt'), '-f', '2',
                            '--same_compute', 'true'))
    assert s['ipc'] == 3 and s['epochs'] == 1000 // 4


# ------------------------------------------------------------------------------- baselines
def test_dsa_and_kip_files_are_unnormalized(fake_fashion, tmp_path, monkeypatch, captured):
    monkeypatch.chdir(tmp_path)
    info = DATASETS['fashion']
    pix = torch.rand(20, 1, 28, 28)
    normed = (pix - info.mean[0]) / info.std[0]
    labels = torch.arange(10).repeat_interleave(2)
    os.makedirs('results/fashion/dsa')
    torch.save({'data': [[normed * 0, labels], [normed, labels]], 'accs_all_exps': {'ConvNet': [
        0.5]}}, 'results/fashion/dsa/res_DSA_FashionMNIST_ConvNet_2ipc.pt')
    evaltest.main(targs(fake_fashion, '-s', 'dsa', '--ipc', '2'))
    assert torch.allclose(captured['images'], pix, atol=1e-5)  # the last pair, in [0, 1]
    assert (tmp_path / 'results/fashion/conv3in_w0.125_dsa2/summary.json').is_file()

    torch.save([normed.permute(0, 2, 3, 1)], tmp_path / 'kip.pt')  # NHWC, labels implied
    evaltest.main(targs(fake_fashion, '-s', 'kip', '--ipc', '2', '--data_path',
                        str(tmp_path / 'kip.pt')))
    assert torch.allclose(captured['images'], pix, atol=1e-5)
    assert torch.equal(captured['targets'], labels)
    assert (tmp_path / 'results/fashion/conv3in_w0.125_kip2/summary.json').is_file()

    # malformed DSA files: one clear error each
    for bad in ({'data': [5]}, {'data': [{'a': normed}]}, {'data': []}):
        torch.save(bad, 'results/fashion/dsa/res_DSA_FashionMNIST_ConvNet_2ipc.pt')
        with pytest.raises(UserError, match=r"'data' should be a list of \[images, labels\]"):
            evaltest.main(targs(fake_fashion, '-s', 'dsa', '--ipc', '2'))


# ------------------------------------------------------------------------------- random, herding
def test_random_takes_first_images_or_a_seeded_draw(fake_fashion, tmp_path, monkeypatch,
                                                    captured):
    monkeypatch.chdir(tmp_path)
    a = targs(fake_fashion, '-s', 'random', '--ipc', '3')
    real = load_split(a, train=True)
    evaltest.main(a)
    first = torch.cat([(real.targets == c).nonzero().flatten()[:3] for c in range(10)])
    assert torch.equal(captured['images'], real.images[first].float() * (1 / 255))
    assert torch.equal(captured['targets'], real.targets[first])
    assert (tmp_path / 'results/fashion/conv3in_w0.125_rand3/summary.json').is_file()
    evaltest.main(targs(fake_fashion, '-s', 'random', '--ipc', '3', '--seed', '0'))
    assert not torch.equal(captured['images'], real.images[first].float() * (1 / 255))
    assert torch.equal(captured['targets'], real.targets[first])  # still class-major


def test_random_selection_trains_above_chance_on_real_fashion(fashion_dir, tmp_path):
    s = evaltest.main(targs(fashion_dir, '-s', 'random', '--ipc', '2', '--epochs', '40',
                            '--save_dir', str(tmp_path)))
    assert s['n_train'] == 20 and s['epochs'] == 40
    assert s['best_mean'] > 25  # chance is 10 %
    # the log says how the training steps ran: 40 optimizer steps stay eager on the CPU
    assert 'training steps eager' in (tmp_path / 'log.txt').read_text()


def test_herding_uses_a_train_py_network(fake_fashion, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / 'test.py'), '-d', 'fashion', '--data_dir',
                        str(fake_fashion), *SMALL, '-s', 'herding', '--ipc', '2'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'model_best.pth.tar not found' in r.stderr and '--herding_ckpt' in r.stderr
    assert not (tmp_path / 'results').exists()

    train.main(parse_args(['-d', 'fashion', '--data_dir', str(fake_fashion), *SMALL, '--epochs',
                           '1', '--save_ckpt', 'true'], mode='train'))
    assert (tmp_path / 'results/fashion/conv3in_w0.125_cut/model_best.pth.tar').is_file()
    s = evaltest.main(targs(fake_fashion, '-s', 'herding', '--ipc', '2', '--epochs', '2'))
    assert s['selection'] == 'herding' and s['n_train'] == 20
    assert 'herding on features (200, 256) of layer 2' in capsys.readouterr().out
    assert (tmp_path / 'results/fashion/conv3in_w0.125_herding2/summary.json').is_file()


# ------------------------------------------------------------------------------- evaluators
def test_evaluator_lists():
    a = parse_args(['-d', 'cifar10', '--ipc', '50', '-f', '2'], mode='test')
    evs = evaltest.evaluators_for(a)
    assert [e.name for e in evs] == ['ConvNet-3-IN', 'ResNet-10-BN', 'DenseNet']
    assert evs[2].epochs == 400 and evs[0].epochs is None
    a = parse_args(['-d', 'cifar10', '--ipc', '50', '-f', '2', '--same_compute', 'true'],
                   mode='test')
    assert evaltest.evaluators_for(a)[2].epochs is None and evaltest.eval_epochs(a) == 250
    a = parse_args(['-d', 'imagenet', '--ipc', '10', '-f', '3'], mode='test')
    assert [e.name for e in evaltest.evaluators_for(a)] == \
        ['ResNetAP-10-IN', 'ResNet-18-BN', 'EfficientNet-B0']
    assert [e.name for e in evaltest.evaluators_for(parse_args(
        ['-d', 'fashion', '--ipc', '1'], mode='test'))] == ['ConvNet-3-IN']


def test_cifar_evaluators_resnet10_densenet(fake_root, tmp_path, capsys):
    s = evaltest.main(targs(fake_root, '-s', 'random', '--ipc', '1', '--epochs', '1',
                            '--skip_checksum', '--save_dir', str(tmp_path), dataset='cifar10'))
    names = [r['evaluator'] for r in s['results']]
    assert names == ['ConvNet-3-IN-w0.125', 'ResNet-10-BN', 'DenseNet']
    assert len(SUMMARY_LINE.findall(capsys.readouterr().out)) == 3
    assert all(len(r['runs']) == 1 and r['epochs'] == 1 for r in s['results'])


def test_imagenet_phases_and_evaluators(fake_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in range(2):  # two partitions of 2 classes, global labels
        condensed(f'results/inet/x_ipc1_2_phase{k}/data.pt', n_per_class=1, nclass=2,
                  shape=(3, 32, 32), seed=k, labels=torch.tensor([2 * k, 2 * k + 1]))
    s = evaltest.main(parse_args(['-d', 'imagenet', '--nclass', '4', '--size', '32',
                                  '--imagenet_dir', str(fake_root / 'imagenet'), '--ipc', '1',
                                  '--name', 'inet/x', '--epochs', '1', '--device', 'cpu'],
                                 mode='test'))
    assert s['n_train'] == 4
    assert [r['evaluator'] for r in s['results']] == \
        ['ResNetAP-10-IN', 'ResNet-18-BN', 'EfficientNet-B0']
    assert (tmp_path / 'results/inet/x_ipc1/summary.json').is_file()
    assert 'concatenated 2 class partitions' in (tmp_path / 'results/inet/x_ipc1/log.txt'
                                                 ).read_text()


def test_evaluate_data_api(fake_fashion, tmp_path):
    a = targs(fake_fashion, '--ipc', '1', '--epochs', '2')
    val = load_split(a, train=False)
    from data import eval_loader
    loader = eval_loader(val, 'fashion', 'cpu')
    images, targets = torch.rand(10, 1, 28, 28), torch.arange(10)
    logger = Logger(str(tmp_path))
    out = evaltest.evaluate_data(a, images, targets, loader, torch.device('cpu'), logger,
                                 evaluators=[evaltest.default_evaluator(a), evaltest.RESNET10_BN],
                                 repeat=2, tag='it10')
    assert list(out) == ['ConvNet-3-IN-w0.125', 'ResNet-10-BN']
    for r in out.values():
        assert len(r['runs']) == 2 and r['epochs'] == 2 and r['repeat'] == 2
        assert set(r) >= {'best_mean', 'best_std', 'last_mean', 'last_std'}
    log = (tmp_path / 'log.txt').read_text()
    assert 'it10 Repeat 2 => Best' not in log and log.count('Repeat 2 => Best, last acc:') == 2
    recs = [json.loads(ln) for ln in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['tag'] for r in recs if r['event'] == 'eval'] == ['it10', 'it10']


# ------------------------------------------------------------------------------- bad input
def _write_bad(kind, path):
    good = [torch.rand(20, 1, 28, 28), torch.arange(10).repeat_interleave(2)]
    if kind == 'truncated':
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == 'foreign':
        torch.save(argparse.Namespace(a=1), path)  # a pickled object: refused by weights_only
    elif kind == 'text':
        path.write_text('not a torch file')
    elif kind == 'count':
        torch.save([good[0][:10], good[1][:10]], path)
    elif kind == 'channels':
        torch.save([torch.rand(20, 3, 28, 28), good[1]], path)
    elif kind == 'size':
        torch.save([torch.rand(20, 1, 32, 32), good[1]], path)
    elif kind == 'not_a_pair':
        torch.save({'images': good[0]}, path)
    elif kind == 'labels':
        torch.save([good[0], good[1] + 5], path)
    elif kind == 'nan':
        torch.save([good[0] * float('nan'), good[1]], path)
    elif kind == 'sparse':
        torch.save([good[0].to_sparse(), good[1]], path)
    elif kind == 'bool_labels':
        torch.save([good[0], good[1] > 4], path)


BAD = {'missing': 'not found', 'truncated': 'cannot be read', 'foreign': 'cannot be read',
       'text': 'cannot be read', 'count': 'holds 10 images, expected nclass\\*ipc',
       'channels': 'images are 3x28x28', 'size': 'images are 1x32x32',
       'not_a_pair': 'not condensed data', 'labels': 'outside 0..9', 'nan': 'NaN',
       'sparse': 'must be dense tensors', 'bool_labels': 'found booleans'}


@pytest.mark.parametrize('kind', sorted(BAD))
def test_bad_condensed_files(fake_fashion, tmp_path, kind):
    path = tmp_path / 'data.pt'
    _write_bad(kind, path)
    with pytest.raises(UserError, match=BAD[kind]):
        evaltest.main(targs(fake_fashion, '--data_path', str(path), '--ipc', '2'))


@pytest.mark.parametrize('kind', ['missing', 'truncated', 'count'])
def test_bad_files_exit_2_with_one_message(fake_fashion, tmp_path, kind):
    path = tmp_path / 'data.pt'
    _write_bad(kind, path)
    r = subprocess.run([sys.executable, str(ROOT / 'test.py'), '-d', 'fashion', '--data_dir',
                        str(fake_fashion), '--data_path', str(path), '--ipc', '2', *SMALL],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and str(path) in err[0]


def test_refused_evaluations_write_nothing(fake_fashion, tmp_path):
    # a mistyped --data_path: no folder appears for it
    with pytest.raises(UserError, match='not found'):
        evaltest.main(targs(fake_fashion, '--data_path', str(tmp_path / 'typo' / 'data.pt')))
    assert not (tmp_path / 'typo').exists()
    # a dataset folder without the test split: nothing is added beside the data
    condensed(str(tmp_path / 'run' / 'data.pt'))
    no_test = tmp_path / 'train_only'
    no_test.mkdir()
    for f in os.listdir(fake_fashion):
        if f.startswith('train'):
            os.symlink(os.path.join(fake_fashion, f), no_test / f)
    with pytest.raises(UserError, match='t10k'):
        evaltest.main(targs(no_test, '--data_path', str(tmp_path / 'run' / 'data.pt'),
                            '--ipc', '2'))
    assert os.listdir(tmp_path / 'run') == ['data.pt']
    # an output folder that cannot be made: one clear message
    (tmp_path / 'afile').write_text('in the way')
    with pytest.raises(UserError, match=r'cannot write the output folder .*--save_dir'):
        evaltest.main(targs(fake_fashion, '--data_path', str(tmp_path / 'run' / 'data.pt'),
                            '--ipc', '2', '--save_dir', str(tmp_path / 'afile' / 'sub')))


def test_no_condensed_data_names_the_options(fake_fashion, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r'_ipc2/data.pt not found.*--data_path'):
        evaltest.main(targs(fake_fashion, '--ipc', '2', '-f', '2'))
