import subprocess
import sys

import pytest

from argument import ipc_epoch, parse_args
from conftest import ROOT


def args_of(line, mode='condense'):
    return parse_args(line.split(), mode=mode)


@pytest.mark.parametrize('line, folder', [
    ('-d fashion -f 2 --ipc 10 --reproduce',
     './results/fashion/conv3in_grad_l1_nd500_cut_niter2000_factor2_lr0.0001_mix_ipc10'),
    ('-d cifar10 -f 1 --ipc 50 --reproduce',
     './results/cifar10/conv3in_grad_mse_nd2000_cut_niter2000_factor1_lr0.005_random_ipc50'),
])
def test_spec_folder_examples(line, folder):
    assert args_of(line).save_dir == folder


def test_random_selection_folder():
    assert args_of('-d fashion --ipc 10 -s random', mode='test').save_dir == \
        './results/fashion/conv3in_rand10'


def test_train_folder_and_imagenet_tags():
    assert args_of('-d cifar10', mode='train').save_dir == './results/cifar10/conv3in_cut'
    a = args_of('-d imagenet --nclass 100 --dseed 2 --mixup vanilla -n resnet --norm_type batch '
                '--depth 18', mode='train')
    assert a.save_dir == './results/imagenet100-seed2/resnet18'
    a = args_of('-d imagenet --nclass 10 --ipc 10 -f 3 --reproduce')
    assert a.save_dir == ('./results/imagenet10/resnet10apin_grad_l1_ely10_nd500_cut_factor3'
                          '_lr0.003_mix_ipc10')
    a = args_of('-d imagenet --nclass 100 --ipc 20 -f 3 --reproduce --nclass_sub 20 --phase 1')
    assert a.save_dir.endswith('_nd500_cut_nlr0.1_wd0.0001_factor3_bound_lr0.001_b_real128'
                               '_mix_ipc20_20_phase1')


def test_explicit_flag_beats_preset_and_dataset_default():
    a = args_of('-d fashion -f 2 --ipc 10 --reproduce --metric mse --mix_p 0.3')
    assert a.metric == 'mse' and a.mix_p == 0.3
    assert '_mse_' in a.save_dir
    assert any('kept over reproduce preset' in ln for ln in a.derived)
    b = args_of('-d fashion -f 2 --ipc 10 --reproduce')
    assert b.metric == 'l1' and b.mix_p == 0.5 and b.niter == 2000


def test_explicit_init_beats_mix_default():
    assert args_of('-d fashion -f 2 --ipc 1').init == 'mix'
    assert args_of('-d fashion -f 2 --ipc 1 --init random').init == 'random'
    assert args_of('-d fashion -f 1 --ipc 1').init == 'random'


def test_lr_img_scaling_uses_unscaled_value_in_tag():
    a = args_of('-d fashion --ipc 10 --reproduce')
    assert a.lr_img == pytest.approx(1e-4 * (28 / 32)**2)
    assert '_lr0.0001_' in a.save_dir
    m = args_of('-d mnist --ipc 50 --reproduce')
    assert m.lr_img == pytest.approx(1e-4 * 5)
    i = args_of('-d imagenet --ipc 20 --lr_img 3e-3')
    assert i.lr_img == pytest.approx(3e-3 * 2)
    c = args_of('-d cifar10 --ipc 1 --lr_img 5e-3 --lr 0.02')
    assert c.lr_img == pytest.approx(5e-4)
    assert '_nlr0.02_' in c.save_dir


def test_augmentation_rules():
    f = args_of('-d fashion --ipc 1')
    assert f.dsa and not f.augment and f.dsa_strategy == 'color_crop_flip_scale_rotate'
    s = args_of('-d svhn --ipc 1')
    assert s.dsa_strategy == 'color_crop_scale_rotate'
    v = args_of('-d cifar10 --ipc 1 --mixup vanilla')
    assert v.dsa_strategy == 'color_crop_cutout_flip_scale_rotate'
    # A flag given on the command line still obeys the transforming rules.
    g = args_of('-d mnist --ipc 1 --dsa_strategy color_flip_cutout_rotate')
    assert g.dsa_strategy == 'color_rotate'


def test_feature_matching_and_depth_rules():
    a = args_of('-d cifar10 --ipc 1 --match feat --metric l1 --depth 6')
    assert a.depth == 3 and a.f_idx == '2' and a.metric == 'mse'
    assert (a.idx_from, a.idx_to) == (2, -1)
    assert '_f2_mse_' in a.save_dir
    assert any('depth' in ln for ln in a.derived)


def test_imagenet_defaults():
    a = args_of('-d imagenet --nclass 100 --ipc 10 -f 2')
    assert a.net_type == 'resnet_ap' and a.size == 224 and not a.load_memory
    assert a.lr == 0.1 and a.weight_decay == 1e-4 and a.batch_size == 128 and a.batch_real == 128
    assert a.epochs == ipc_epoch(10, 2, 100) == 1000
    b = args_of('-d imagenet --nclass 10 --ipc 20 -f 3 --reproduce')
    assert b.decode_type == 'bound' and b.epochs == 1000  # min(20 * 9, 128) decoded per class
    c = args_of('-d imagenet --ipc 1 --epochs 7 -n convnet --depth 4 --size 64')
    assert c.epochs == 7 and c.net_type == 'convnet' and c.size == 64


def test_ipc_epoch_table():
    assert [ipc_epoch(i, 1) for i in (1, 10, 50, 200, 500, 501)] == \
        [3000, 2000, 1500, 1000, 500, 300]
    assert ipc_epoch(1, 1, nclass=100) == 2000


def test_evaluation_epochs_and_test_overrides():
    assert args_of('-d cifar10 --ipc 10').epochs == 1000
    assert args_of('-d cifar10', mode='train').epochs == 300
    m = args_of('-d mnist --ipc 10 -f 2', mode='test')
    assert m.mixup == 'vanilla' and m.dsa_strategy == 'color_crop_scale_rotate'
    s = args_of('-d svhn --ipc 1 -f 1', mode='test')
    assert s.mixup == 'vanilla' and s.dsa_strategy == 'color_crop_cutout_scale_rotate'
    assert args_of('-d mnist --ipc 10 -f 2').mixup == 'cut'  # condense mode: no override


def test_test_flag_and_save_dir():
    assert args_of('-d fashion --ipc 1 --test').save_dir == './results/test'
    assert args_of('-d fashion --ipc 1 --test --save_dir out/x').save_dir == 'out/x'


@pytest.mark.parametrize('line, message', [
    ('-d fashion --ipc 0', '--ipc must be at least 1'),
    ('-d fashion --ipc 1 -f 0', '--factor must be at least 1'),
    ('-d fashion --ipc 1 -f 29', 'larger than the image side'),
    ('-d nope --ipc 1', "invalid choice: 'nope'"),
    ('-d fashion --ipc 1 -n nonet', "invalid choice: 'nonet'"),
    ('-d fashion --ipc 1 --depth 0', '--depth must be at least 1'),
    ('-d fashion --ipc 1 --niter 0', '--niter must be at least 1'),
    ('-d fashion --ipc 1 --inner_loop 0', '--inner_loop must be at least 1'),
    ('-d fashion --ipc 1 --batch_syn_max 0', '--batch_syn_max must be at least 1'),
    ('-d fashion --ipc 1 --batch_classes -1', '--batch_classes must be 0'),
    ('-d fashion --ipc 1 --match_layout nhwc', "invalid choice: 'nhwc'"),
    ('-d fashion --ipc 1 --cuda_graphs on --amp', 'do not go together'),
    ('-d imagenet --nclass 100 --ipc 1 --nclass_sub 30 --phase 0', 'not a multiple'),
    ('-d imagenet --nclass 100 --ipc 1 --nclass_sub 20', 'go together'),
])
def test_bad_values_are_argparse_errors(line, message, capsys):
    with pytest.raises(SystemExit) as e:
        args_of(line)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_train_mode_needs_no_ipc():
    assert args_of('-d fashion', mode='train').ipc == -1


def test_import_reads_no_argv_and_parse_is_pure(tmp_path):
    code = ('import sys; sys.argv = ["x", "--bogus"]; import argument; '
            'a = argument.parse_args(["-d", "fashion", "--ipc", "1"]); print(a.save_dir)')
    out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                         text=True, env={'PYTHONPATH': str(ROOT), 'PATH': '/usr/bin:/bin'})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith('./results/fashion/')
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_test_py_refuses_resume_rather_than_ignoring_it(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(['-d', 'fashion', '--ipc', '1', '--resume'], mode='test')
    assert e.value.code == 2 and 'test.py has no --resume' in capsys.readouterr().err
    assert parse_args(['-d', 'fashion', '--ipc', '1', '--resume']).resume  # condense.py resumes
