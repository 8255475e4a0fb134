import pytest
import torch

from misc.augment import DiffAug, Normalize, build_match_aug, build_net_aug, remove_aug

SINGLE_OPS = ['color', 'crop', 'cutout', 'flip', 'scale', 'rotate', 'translate']


def _images(n=8, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)  # (N, C, H, W) in [0, 1]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize('batch', [True, False])
@pytest.mark.parametrize('strategy', ['color_crop_cutout_flip_scale_rotate', 'color_crop_cutout',
                                      'translate', 'none', ''])
def test_shape_dtype_device_finite(strategy, batch):
    x = _images()
    aug = DiffAug(strategy, batch=batch)
    for seed in range(5):
        y = aug(x, generator=_gen(seed))
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y).all()


def test_identity_strategies():
    x = _images()
    assert torch.equal(DiffAug('none')(x), x)
    assert torch.equal(DiffAug('')(x), x)


@pytest.mark.parametrize('batch', [True, False])
def test_geometric_keeps_unit_range(batch):
    x = _images(n=16)
    aug = DiffAug('crop_flip_scale_rotate', batch=batch)
    for seed in range(20):
        y = aug(x, generator=_gen(seed))
        assert y.min() >= 0.0 and y.max() <= 1.0 + 1e-6


@pytest.mark.parametrize('op', SINGLE_OPS)
@pytest.mark.parametrize('batch', [True, False])
def test_differentiable(op, batch):
    x = _images().requires_grad_(True)
    weights = torch.randn(x.shape, generator=_gen(1))
    y = DiffAug(op, batch=batch)(x, generator=_gen(2))
    (y * weights).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


def test_seed_reproducible():
    x = _images()
    aug = DiffAug('color_crop_cutout_flip_scale_rotate', batch=False)
    assert torch.equal(aug(x, generator=_gen(3)), aug(x, generator=_gen(3)))
    assert not torch.equal(aug(x, generator=_gen(3)), aug(x, generator=_gen(4)))


def test_global_seed_reproducible():
    x = _images()
    aug = DiffAug('color_crop_cutout_flip_scale_rotate', batch=False)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    assert torch.equal(a, aug(x))


@pytest.mark.parametrize('strategy', ['color_crop_cutout_flip_scale_rotate', 'color_crop_cutout',
                                      'scale', 'rotate', 'translate', 'cutout'])
def test_batch_mode_shares_parameters(strategy):
    x = _images(n=1).expand(8, -1, -1, -1).contiguous()  # 8 identical samples
    shared = DiffAug(strategy, batch=True)(x, generator=_gen(5))
    assert all(torch.allclose(shared[i], shared[0], atol=1e-6) for i in range(8))
    separate = DiffAug(strategy, batch=False)(x, generator=_gen(5))
    assert any(not torch.allclose(separate[i], separate[0], atol=1e-6) for i in range(8))


def test_one_geometric_op_per_call():
    # 'scale_rotate' applies exactly one of the two per call: the output equals scale alone or
    # rotate alone for the same remaining draws, and both get picked across seeds.
    x = _images(n=2)
    aug = DiffAug('scale_rotate', batch=True)
    assert aug.choices == ['scale', 'rotate'] and not (aug.flip or aug.color or aug.cutout)
    picked = set()
    for seed in range(12):
        g = _gen(seed)
        after_choice = _gen(seed)
        torch.randint(2, (1,), generator=after_choice)  # the op choice comes first
        state = after_choice.get_state()
        y = aug(x, generator=g)
        for name in aug.choices:
            g_op = torch.Generator().set_state(state)
            if torch.equal(y, aug._fns[name](x, g_op)):
                picked.add(name)
                break
        else:
            raise AssertionError('output is not a single geometric op')
    assert picked == {'scale', 'rotate'}


def test_single_pools_every_op():
    single = DiffAug('color_flip_cutout', single=True)
    assert single.choices == ['color', 'flip', 'cutout'] and not single.flip


def test_unknown_strategy_rejected():
    with pytest.raises(ValueError, match='blur'):
        DiffAug('color_blur')


def test_flip_is_mirror():
    x = _images(n=1)
    aug = DiffAug('flip', batch=True)
    outs = [aug(x, generator=_gen(s)) for s in range(20)]
    assert all(torch.equal(o, x) or torch.equal(o, x.flip(3)) for o in outs)
    assert any(torch.equal(o, x.flip(3)) for o in outs) and any(torch.equal(o, x) for o in outs)


def test_cutout_zeroes_a_box():
    x = torch.ones(4, 3, 16, 16)
    y = DiffAug('cutout', batch=False)(x, generator=_gen(0))
    zeros = (y == 0).all(1).float().sum(dim=(1, 2))  # zeroed pixels per image
    assert ((zeros > 0) & (zeros <= 64)).all()  # an 8x8 box, possibly clipped at the border


def test_remove_aug():
    assert remove_aug('color_crop_cutout_flip_scale_rotate', 'cutout') == \
        'color_crop_flip_scale_rotate'
    assert remove_aug('color_crop_cutout', 'cutout_color') == 'crop'
    assert remove_aug('color_crop', 'flip') == 'color_crop'


def test_normalize_broadcasts_on_input_device():
    norm = Normalize([0.5, 0.25, 0.0], [0.5, 0.5, 1.0])
    x = torch.ones(2, 3, 4, 4)
    y = norm(x)
    assert y.device == x.device
    assert torch.allclose(y[:, 0], torch.ones(2, 4, 4))
    assert torch.allclose(y[:, 1], torch.full((2, 4, 4), 1.5))
    assert torch.allclose(norm(x[0])[2], torch.ones(4, 4))  # (C, H, W) works too
    assert norm(x.double()).dtype == torch.float64


def test_builders():
    mean, std = [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]
    match = build_match_aug('color_crop_cutout', mean, std)
    assert match.transforms[1].batch and match.transforms[1].cutout
    net = build_net_aug('color_crop_cutout', mean, std, mixup_net='cut')
    assert not net.transforms[1].batch and not net.transforms[1].cutout
    assert build_net_aug('color_crop_cutout', mean, std, mixup_net='vanilla').transforms[1].cutout
    x = _images()
    assert torch.equal(match(x, generator=_gen(0)), match(x, generator=_gen(0)))
    # normalization comes first: with identity augmentation the output is just normalized
    plain = build_match_aug('none', mean, std)(x)
    assert torch.allclose(plain, (x - 0.5) / 0.2)


def test_augmented_batches_come_out_nchw():
    # A 1-channel batch with channel stride 1 passes contiguous() but runs through convolutions
    # as channels_last, whose float32 double backward is far less accurate on the CPU.
    from misc.device import standard_layout
    x = torch.rand(6, 1, 10, 10)
    for strategy in ('crop', 'translate', 'color_crop_cutout', 'scale', 'rotate', 'flip'):
        for batch in (True, False):
            out = DiffAug(strategy, batch=batch)(x, generator=torch.Generator().manual_seed(0))
            assert out.stride() == (100, 100, 10, 1), strategy
    odd = torch.empty_strided(x.shape, (100, 1, 10, 1)).copy_(x)
    assert odd.is_contiguous() and odd.stride() == (100, 1, 10, 1)
    assert standard_layout(odd).stride() == (100, 100, 10, 1)
    assert torch.equal(standard_layout(odd), x) and standard_layout(x) is x
