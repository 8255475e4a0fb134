"""Tests for models/: registry, shapes, gradients, and the original's state_dict key names."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import MODELS, ConvNet, ResNet, ResNetAP, get_model
from models.resnet import stem_size
from models.resnet_ap import conv_stride1

NCLASS = 10
# (dataset, size, channels): the input kinds the networks meet in IDC.
MNIST_LIKE = ('fashion', 28, 1)
CIFAR_LIKE = ('cifar10', 32, 3)
IMAGENET_LIKE = ('imagenet', 64, 3)
IMAGENET_STYLE = ('resnet', 'resnet_ap', 'efficient')
# Per-model depth and norm as the evaluation protocol uses them.
MODEL_KWARGS = {
    'convnet': dict(depth=3, norm_type='instance'),
    'resnet': dict(depth=10, norm_type='batch'),
    'resnet_ap': dict(depth=10, norm_type='instance'),
    'densenet': {},
    'efficient': {},
}


def _cases():
    for name in sorted(MODELS):
        inputs = [MNIST_LIKE, CIFAR_LIKE] + ([IMAGENET_LIKE] if name in IMAGENET_STYLE else [])
        for dataset, size, nch in inputs:
            yield pytest.param(name, dataset, size, nch, id=f'{name}-{dataset}-{size}px-{nch}ch')


def _forward_backward(model, x):
    """One CE step; returns the logits after checking that every parameter got a finite grad."""
    model.train()
    out = model(x)
    target = torch.arange(x.shape[0]) % out.shape[1]
    F.cross_entropy(out, target).backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, g in grads if g is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert all(torch.isfinite(g).all() for _, g in grads)
    assert any(g.abs().sum() > 0 for _, g in grads)
    return out


def test_registry_has_the_original_networks():
    assert set(MODELS) == {'convnet', 'resnet', 'resnet_ap', 'densenet', 'efficient'}


@pytest.mark.filterwarnings('error')  # also: no deprecation warnings from building or running
@pytest.mark.parametrize('name, dataset, size, nch', list(_cases()))
def test_forward_backward(name, dataset, size, nch):
    torch.manual_seed(0)
    model = get_model(name, NCLASS, nch=nch, size=size, dataset=dataset, **MODEL_KWARGS[name])
    x = torch.randn(2, nch, size, size)  # (N, C, H, W)
    out = _forward_backward(model, x)
    assert out.shape == (2, NCLASS)
    assert torch.isfinite(out).all()


@pytest.mark.filterwarnings('error')
@pytest.mark.parametrize('norm_type', ['batch', 'instance', 'sn', 'none'])
def test_resnet_ap_norm_types(norm_type):
    torch.manual_seed(0)
    model = get_model('resnet_ap', NCLASS, size=32, depth=10, norm_type=norm_type, dataset='svhn')
    out = _forward_backward(model, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, NCLASS)
    # Without a norm layer the convs carry a bias, as in the original.
    assert (model.layer1[0].conv1.bias is not None) == (norm_type in ('sn', 'none'))


def test_resnet_rejects_unknown_norm_and_depth():
    with pytest.raises(ValueError):
        ResNet('cifar10', 10, NCLASS, norm_type='sn')
    with pytest.raises(ValueError):
        ResNetAP('imagenet', 11, NCLASS, size=64)
    with pytest.raises(ValueError):
        ResNet('cifar10', 3, NCLASS)  # fewer than one block per stage


def test_unknown_model_raises_with_known_names():
    with pytest.raises(ValueError) as err:
        get_model('vgg', NCLASS)
    for name in ('convnet', 'resnet', 'resnet_ap', 'densenet', 'efficient'):
        assert name in str(err.value)


def test_register_adds_constructor_and_refuses_duplicates(monkeypatch):
    monkeypatch.setattr(models, 'MODELS', dict(MODELS))

    @models.register('tiny')
    def _tiny(nclass, nch, size, depth, width, norm_type, dataset):
        return nn.Sequential(nn.Flatten(), nn.Linear(nch * size * size, nclass))

    assert models.get_model('tiny', 3, nch=1, size=4)(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(ValueError):
        models.register('convnet')(_tiny)
    assert 'tiny' not in MODELS  # the real registry was untouched


def test_import_creates_no_tensors_and_touches_no_cuda():
    code = ('import sys, torch, models; '
            'assert not torch.cuda.is_initialized(); '
            "assert 'efficientnet_pytorch' not in sys.modules")
    subprocess.run([sys.executable, '-c', code], check=True)


# ConvNet


def _original_convnet_state(nch, nclass=NCLASS, width=128, depth=3, norm='instance'):
    """State dict with the original ConvNet's key names and shapes (32 px features: 4x4 at depth 3)."""
    state = {}
    in_ch = nch
    for d in range(depth):
        state[f'layers.conv.{d}.weight'] = torch.randn(width, in_ch, 3, 3)
        state[f'layers.conv.{d}.bias'] = torch.randn(width)
        in_ch = width
    for d in range(depth):
        state[f'layers.norm.{d}.weight'] = torch.randn(width)
        state[f'layers.norm.{d}.bias'] = torch.randn(width)
        if norm == 'batch':
            state[f'layers.norm.{d}.running_mean'] = torch.randn(width)
            state[f'layers.norm.{d}.running_var'] = torch.rand(width) + 0.5
            state[f'layers.norm.{d}.num_batches_tracked'] = torch.tensor(7)
    side = 32 // 2**depth
    state['classifier.weight'] = torch.randn(nclass, width * side * side)
    state['classifier.bias'] = torch.randn(nclass)
    return state


@pytest.mark.parametrize('nch, size, norm', [(3, 32, 'instance'), (1, 28, 'instance'),
                                             (3, 32, 'batch')])
def test_convnet_loads_original_key_names(nch, size, norm):
    model = get_model('convnet', NCLASS, nch=nch, size=size, norm_type=norm)
    state = _original_convnet_state(nch, norm=norm)
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert list(loaded) == list(state)  # same keys, in the original's order
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_convnet_28px_1ch_matches_32px_3ch_features():
    gray = get_model('convnet', NCLASS, nch=1, size=28)
    color = get_model('convnet', NCLASS, nch=3, size=32)
    assert gray.layers['conv'][0].padding == (3, 3)
    assert gray.layers['conv'][1].padding == (1, 1)
    assert color.layers['conv'][0].padding == (1, 1)
    assert gray.classifier.in_features == color.classifier.in_features == 128 * 4 * 4
    feats = gray.get_feature(torch.randn(2, 1, 28, 28), 0, 2)
    assert [tuple(f.shape) for f in feats] == [(2, 128, 16, 16), (2, 128, 8, 8), (2, 128, 4, 4)]


def test_convnet_width_and_depth_follow_get_model():
    model = get_model('convnet', NCLASS, depth=4, width=0.5)
    assert len(model.layers['conv']) == 4
    assert model.layers['conv'][3].out_channels == 64
    assert model.classifier.in_features == 64 * 2 * 2


@pytest.mark.parametrize('norm', ['instance', 'batch', 'layer', 'group', 'none'])
@pytest.mark.parametrize('act', ['relu', 'sigmoid', 'leakyrelu'])
@pytest.mark.parametrize('pooling', ['avgpooling', 'maxpooling', 'none'])
def test_convnet_options(norm, act, pooling):
    width = 8
    model = ConvNet(NCLASS, net_norm=norm, net_depth=2, net_width=width, channel=1,
                    net_act=act, net_pooling=pooling, im_size=(28, 28))
    side = 32 // 4 if pooling != 'none' else 32  # first conv 28 -> 32, then 'same' convs
    assert model.classifier.in_features == width * side * side
    norm_types = {'instance': nn.GroupNorm, 'batch': nn.BatchNorm2d, 'layer': nn.LayerNorm,
                  'group': nn.GroupNorm}
    if norm == 'none':
        assert len(model.layers['norm']) == 0
    else:
        assert all(isinstance(m, norm_types[norm]) for m in model.layers['norm'])
    if norm in ('instance', 'group'):
        assert model.layers['norm'][0].num_groups == (width if norm == 'instance' else 4)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, NCLASS)
    assert model.get_feature(x, 1)[0].shape == (2, width, side, side)


def test_convnet_rejects_unknown_options():
    for kwargs in (dict(net_norm='weird'), dict(net_act='tanh'), dict(net_pooling='strided')):
        with pytest.raises(ValueError):
            ConvNet(NCLASS, **kwargs)


def test_convnet_get_feature():
    torch.manual_seed(0)
    model = get_model('convnet', NCLASS).eval()
    x = torch.randn(3, 3, 32, 32)
    single = model.get_feature(x, 1)
    assert len(single) == 1 and single[0].shape == (3, 128, 8, 8)
    span = model.get_feature(x, 0, 2)
    assert [tuple(f.shape) for f in span] == [(3, 128, 16, 16), (3, 128, 8, 8), (3, 128, 4, 4)]
    assert torch.allclose(span[1], single[0])
    # The last block's features are what the classifier sees.
    logit, feat = model(x, return_features=True)
    assert torch.allclose(feat, span[2].flatten(1))
    assert torch.allclose(logit, model(x))
    # idx_to past the last block returns the blocks there are.
    assert len(model.get_feature(x, 1, 10)) == 2


# ResNet / ResNetAP


def test_stem_selection_follows_dataset_and_size():
    assert stem_size('cifar10', 224) == 'small'
    assert stem_size('imagenet', 64) == 'small'
    assert stem_size('imagenet', 65) == 'mid'
    assert stem_size('imagenet', 128) == 'mid'
    assert stem_size('imagenet', 224) == 'large'
    assert stem_size('imagenet', -1) == 'large'


@pytest.mark.parametrize('cls', [ResNet, ResNetAP])
@pytest.mark.parametrize('size, stem_side', [(64, 64), (112, 56), (224, 56)])
def test_imagenet_stems(cls, size, stem_side):
    torch.manual_seed(0)
    model = cls('imagenet', 10, NCLASS, norm_type='batch', size=size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model.get_feature(x, 0, 6)
    assert feats[0].shape == (1, 64, stem_side, stem_side)
    assert feats[4].shape == (1, 512, stem_side // 8, stem_side // 8)
    assert feats[6].shape == (1, NCLASS)


def test_cifar_resnet_is_the_narrow_network():
    cifar = ResNet('cifar10', 10, NCLASS, 'batch', 32)
    svhn = ResNet('svhn', 10, NCLASS, 'batch', 32)
    assert cifar.layer0.conv1.out_channels == 32 and cifar.fc.in_features == 256
    assert svhn.layer0.conv1.out_channels == 64 and svhn.fc.in_features == 512
    assert len(ResNet('cifar10', 18, NCLASS).layer1) == 2  # (18 - 2) // 6 blocks per stage


def test_resnet_ap_width():
    model = ResNetAP('imagenet', 10, NCLASS, width=0.5, size=64)
    assert model.layer1[0].conv1.out_channels == 32
    assert model.fc.in_features == 256


@pytest.mark.parametrize('cls', [ResNet, ResNetAP])
def test_resnet_get_feature(cls):
    torch.manual_seed(0)
    model = cls('imagenet', 10, NCLASS, norm_type='instance', size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.get_feature(x, 0, 6)
        sides = [64, 64, 32, 16, 8]
        channels = [64, 64, 128, 256, 512]
        for f, c, s in zip(feats[:5], channels, sides):
            assert f.shape == (2, c, s, s)
        assert feats[5].shape == (2, 512)  # pooled features (herding uses index 5)
        assert torch.allclose(feats[6], model(x), atol=1e-6)
        assert torch.allclose(model.get_feature(x, 5)[0], feats[5], atol=1e-6)
        assert len(model.get_feature(x, 2, 3)) == 2


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_resnet_original_key_names():
    shapes = _shapes(ResNet('cifar10', 10, NCLASS, 'batch', 32))
    assert shapes['layer0.conv1.weight'] == (32, 3, 3, 3)
    assert shapes['layer0.bn1.running_mean'] == (32,)
    assert shapes['layer1.0.conv2.weight'] == (32, 32, 3, 3)
    assert shapes['layer2.0.conv1.weight'] == (64, 32, 3, 3)
    assert shapes['layer2.0.downsample.0.weight'] == (64, 32, 1, 1)
    assert shapes['layer2.0.downsample.1.running_var'] == (64,)
    assert shapes['fc.weight'] == (NCLASS, 256)
    assert 'layer1.0.downsample.0.weight' not in shapes
    # stem 1 + 5 (conv, BN with 5 entries), 4 blocks x 12, 3 shortcuts x 6, fc 2
    assert len(shapes) == 6 + 4 * 12 + 3 * 6 + 2


def test_resnet_ap_original_key_names():
    shapes = _shapes(ResNetAP('imagenet', 10, NCLASS, norm_type='instance', size=224))
    assert shapes['layer0.conv1.weight'] == (64, 3, 7, 7)
    assert shapes['layer0.bn1.weight'] == (64,)
    assert shapes['layer3.0.conv1.weight'] == (256, 128, 3, 3)
    assert shapes['layer3.0.downsample.0.weight'] == (256, 128, 1, 1)
    assert shapes['layer3.0.downsample.2.weight'] == (256,)  # index 1 is the AvgPool
    assert shapes['fc.weight'] == (NCLASS, 512)
    assert not any(k.endswith('.bias') and 'conv' in k for k in shapes)
    none = _shapes(ResNetAP('imagenet', 10, NCLASS, norm_type='none', size=224))
    assert none['layer0.conv1.bias'] == (64,)
    assert none['layer3.0.downsample.0.bias'] == (256,)
    assert not any('bn' in k for k in none)


def _to_old_spectral_norm_keys(state):
    renames = {'parametrizations.weight.original': 'weight_orig',
               'parametrizations.weight.0._u': 'weight_u',
               'parametrizations.weight.0._v': 'weight_v'}
    old = {}
    for key, value in state.items():
        for new, old_name in renames.items():
            key = key.replace(new, old_name)
        old[key] = value
    return old


def test_spectral_norm_checkpoint_with_original_keys_loads():
    torch.manual_seed(0)
    source = ResNetAP('cifar10', 10, NCLASS, norm_type='sn', size=32)
    old_state = _to_old_spectral_norm_keys(source.state_dict())
    assert 'layer1.0.conv1.weight_orig' in old_state and 'layer1.0.conv1.weight_u' in old_state
    target = ResNetAP('cifar10', 10, NCLASS, norm_type='sn', size=32)
    target.load_state_dict(old_state, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_spectral_norm_matches_the_original_hook_based_one():
    """A conv normalised by torch.nn.utils.spectral_norm (the original's) computes the same."""
    torch.manual_seed(0)
    old = nn.utils.spectral_norm(nn.Conv2d(4, 8, kernel_size=3, padding=1))
    x = torch.randn(2, 4, 8, 8)
    for _ in range(3):  # power iterations in train mode move u and v
        old(x)
    old.eval()
    new = conv_stride1(4, 8, kernel_size=3, norm_type='sn')
    new.load_state_dict(old.state_dict(), strict=True)
    new.eval()
    with torch.no_grad():
        assert torch.allclose(new(x), old(x), atol=1e-5)


def test_resnet_init_reaches_spectral_norm_weights():
    torch.manual_seed(0)
    model = ResNetAP('imagenet', 10, NCLASS, norm_type='sn', size=64)
    conv = model.layer4[0].conv2  # 3x3, 512 -> 512
    std = conv.parametrizations.weight.original.std().item()
    assert std == pytest.approx(math.sqrt(2. / (9 * 512)), rel=0.05)
    bn = ResNet('cifar10', 10, NCLASS, 'batch').layer1[0].bn1
    assert torch.equal(bn.weight, torch.ones(32)) and torch.equal(bn.bias, torch.zeros(32))


# DenseNet / EfficientNet


def test_densenet_cifar_shapes():
    shapes = _shapes(get_model('densenet', NCLASS))
    assert shapes['conv1.weight'] == (24, 3, 3, 3)
    assert shapes['dense1.0.conv1.weight'] == (48, 24, 1, 1)
    assert shapes['trans1.conv.weight'] == (48, 96, 1, 1)
    assert shapes['linear.weight'] == (NCLASS, 384)
    assert len([k for k in shapes if k.startswith('dense4.') and k.endswith('conv2.weight')]) == 16
    assert _shapes(get_model('densenet', NCLASS, nch=1))['conv1.weight'] == (24, 1, 3, 3)


def test_efficientnet_is_b0_with_nclass_outputs():
    model = get_model('efficient', 7)
    assert model._fc.out_features == 7
    assert model._conv_stem.in_channels == 3
    assert 5_000_000 > sum(p.numel() for p in model.parameters()) > 3_500_000


def test_efficientnet_at_224_is_the_original_network():
    from efficientnet_pytorch import EfficientNet
    ours = get_model('efficient', NCLASS, size=224)
    original = EfficientNet.from_name('efficientnet-b0', num_classes=NCLASS)
    assert str(ours) == str(original)  # includes every conv's fixed 'same' padding
    assert _shapes(ours) == _shapes(original)


# Condensation differentiates through the networks' gradients (gradient matching).


@pytest.mark.parametrize('name, kwargs', [
    ('convnet', dict(depth=3, norm_type='instance')),
    ('resnet_ap', dict(depth=10, norm_type='instance', dataset='imagenet')),
    ('resnet', dict(depth=10, norm_type='batch')),
])
def test_second_order_gradients_reach_the_input(name, kwargs):
    torch.manual_seed(0)
    model = get_model(name, NCLASS, **kwargs)
    params = [p for p in model.parameters()]
    syn = torch.rand(4, 3, 32, 32, requires_grad=True)  # (N, C, H, W) synthetic images
    target = torch.arange(4) % NCLASS
    grads = torch.autograd.grad(F.cross_entropy(model(syn), target), params, create_graph=True)
    loss = sum((g ** 2).sum() for g in grads if g.dim() > 2)  # conv weights, as IDC matches
    loss.backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0
