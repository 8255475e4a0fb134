"""Differentiable Siamese Augmentation (DSA) as used by IDC.

Every operation is built from differentiable tensor ops (affine_grid/grid_sample, index
gathers, multiplicative masks), so gradients flow from the augmented batch back to the
synthetic images. All random parameters are drawn as tensors, optionally from a
``torch.Generator``; there are no per-sample Python loops.

Two modes, as in the original:
- ``batch=True``: one parameter draw shared by the whole batch (used for matching, where the
  real and synthetic images of a class are augmented together and must see the same transform).
- ``batch=False``: an independent draw per sample (used to train networks).

Ranges: the colour operations shift and scale values and can leave [0, 1] (or the normalized
range); the original does not clamp and neither do we. Geometric operations pad with zeros,
so on inputs in [0, 1] they stay in [0, 1].
"""
import math

import torch
import torch.nn.functional as F

from misc.device import standard_layout
from misc.utils import to_device

# Always applied when listed (unless single=True); every other listed name is a candidate of
# which ONE is picked per call.
_ALWAYS = ('flip', 'color', 'cutout')
_KNOWN = _ALWAYS + ('crop', 'scale', 'rotate', 'translate')


def remove_aug(strategy, remove):
    """Drop the '_'-separated items of `remove` from the '_'-joined `strategy`."""
    removed = set(remove.split('_'))
    return '_'.join(a for a in strategy.split('_') if a not in removed)


# ---------------------------------------------------------------------------------------------
# Random draws. They happen where the generator lives (a CPU generator may drive a CUDA input)
# and are then moved to the input's device.


def _draw_device(x, generator):
    return generator.device if generator is not None else x.device


def _uniform(shape, x, generator):
    """U[0, 1) of `shape` on x.device, in x's floating dtype."""
    u = torch.rand(shape, generator=generator, device=_draw_device(x, generator))
    return to_device(u, x.device).to(x.dtype)


def _randint(low, high, shape, x, generator):
    """Integers in [low, high) of `shape` on x.device."""
    r = torch.randint(low, high, shape, generator=generator, device=_draw_device(x, generator))
    return to_device(r, x.device)


def _choose(n, generator):
    # Drawn on the CPU (or the generator's device) so that picking an op never waits on the GPU.
    device = generator.device if generator is not None else 'cpu'
    return int(torch.randint(n, (1,), generator=generator, device=device).item())


# ---------------------------------------------------------------------------------------------
# Geometric helpers.


def _warp(x, theta):
    """Resample x with per-sample (or shared) affine matrices theta (n, 2, 3); zero padding."""
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


def _shift(x, dx, dy):
    """Integer translation: dx (n, 1, 1) rows, dy (n, 1, 1) columns; vacated pixels become 0."""
    N, _, H, W = x.shape
    x_pad = F.pad(x, (1, 1, 1, 1))  # a zero border that out-of-range reads land on
    rows = (torch.arange(H, device=x.device).view(1, H, 1) + dx + 1).clamp(0, H + 1)
    cols = (torch.arange(W, device=x.device).view(1, 1, W) + dy + 1).clamp(0, W + 1)
    batch = torch.arange(N, device=x.device).view(N, 1, 1)
    # (N, H, W, C) gather, then back to (N, C, H, W)
    return x_pad.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class DiffAug:
    """DSA augmentation: flip, colour, ONE geometric op among those listed, then cutout."""

    def __init__(self,
                 strategy='color_crop_cutout_flip_scale_rotate',
                 batch=False,
                 ratio_cutout=0.5,
                 single=False):
        self.prob_flip = 0.5
        self.ratio_scale = 1.2
        self.ratio_rotate = 15.0  # degrees
        self.ratio_crop_pad = 0.125
        self.ratio_cutout = ratio_cutout
        self.brightness = 1.0
        self.saturation = 2.0
        self.contrast = 0.5

        self.strategy = strategy
        self.batch = batch
        names = [] if strategy.lower() in ('', 'none') else strategy.lower().split('_')
        names = [n for n in names if n]
        unknown = sorted(set(names) - set(_KNOWN))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown} in '{strategy}'; "
                             f"known: {', '.join(_KNOWN)}")

        # single=True: even flip/colour/cutout join the pool of which one op is picked.
        self.flip = 'flip' in names and not single
        self.color = 'color' in names and not single
        self.cutout = 'cutout' in names and not single
        self.choices = [n for n in names if single or n not in _ALWAYS]
        self._fns = {
            'color': self.color_fn,
            'crop': self.crop_fn,
            'cutout': self.cutout_fn,
            'flip': self.flip_fn,
            'scale': self.scale_fn,
            'rotate': self.rotate_fn,
            'translate': self.translate_fn,
        }

    def __repr__(self):
        return f"DiffAug(strategy='{self.strategy}', batch={self.batch})"

    def __call__(self, x, generator=None):
        """x: (N, C, H, W) -> augmented x, same shape, dtype and device."""
        if not (self.flip or self.color or self.choices or self.cutout):
            return x
        if self.flip:
            x = self.flip_fn(x, generator)
        if self.color:
            x = self.color_fn(x, generator)
        if self.choices:
            x = self._fns[self.choices[_choose(len(self.choices), generator)]](x, generator)
        if self.cutout:
            x = self.cutout_fn(x, generator)
        # NCHW strides: the gathers above can leave a 1-channel batch with channel stride 1,
        # which convolutions and norms would run as channels_last unasked (on the CPU their
        # eager float32 double backward rounds 1e-3 to 1e-2 off float64; NCHW: mostly 1e-6)
        return standard_layout(x)

    def _n(self, x):
        """Number of parameter draws: one shared, or one per sample."""
        return 1 if self.batch else x.shape[0]

    # --- colour -------------------------------------------------------------------------------
    def color_fn(self, x, generator=None):
        x = self.brightness_fn(x, generator)
        x = self.saturation_fn(x, generator)
        return self.contrast_fn(x, generator)

    def brightness_fn(self, x, generator=None):
        # additive shift in [-0.5, 0.5) * brightness
        r = _uniform((self._n(x), 1, 1, 1), x, generator)
        return x + (r - 0.5) * self.brightness

    def saturation_fn(self, x, generator=None):
        # scale the deviation from the per-pixel channel mean by [0, saturation)
        mean = x.mean(dim=1, keepdim=True)
        r = _uniform((self._n(x), 1, 1, 1), x, generator)
        return (x - mean) * (r * self.saturation) + mean

    def contrast_fn(self, x, generator=None):
        # scale the deviation from the per-image mean by [contrast, contrast + 1)
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        r = _uniform((self._n(x), 1, 1, 1), x, generator)
        return (x - mean) * (r + self.contrast) + mean

    # --- geometric ----------------------------------------------------------------------------
    def flip_fn(self, x, generator=None):
        coin = _uniform((self._n(x), 1, 1, 1), x, generator)
        return torch.where(coin < self.prob_flip, x.flip(3), x)

    def scale_fn(self, x, generator=None):
        # independent x/y scale factors in [1/ratio, ratio)
        r = self.ratio_scale
        s = _uniform((self._n(x), 2), x, generator) * (r - 1.0 / r) + 1.0 / r
        zero = torch.zeros_like(s[:, 0])
        theta = torch.stack([torch.stack([s[:, 0], zero, zero], -1),
                             torch.stack([zero, s[:, 1], zero], -1)], 1)  # (n, 2, 3)
        return _warp(x, theta)

    def rotate_fn(self, x, generator=None):
        # angle uniform in [-ratio_rotate, ratio_rotate) degrees
        u = _uniform((self._n(x),), x, generator)
        a = (u - 0.5) * 2 * self.ratio_rotate / 180 * math.pi
        cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zero], -1),
                             torch.stack([sin, cos, zero], -1)], 1)  # (n, 2, 3)
        return _warp(x, theta)

    def crop_fn(self, x, generator=None):
        # "pad and crop": integer shift of up to ratio_crop_pad of each side, zero fill
        H, W = x.shape[2], x.shape[3]
        sh, sw = int(H * self.ratio_crop_pad + 0.5), int(W * self.ratio_crop_pad + 0.5)
        dx = _randint(-sh, sh + 1, (self._n(x), 1, 1), x, generator)
        dy = _randint(-sw, sw + 1, (self._n(x), 1, 1), x, generator)
        return _shift(x, dx, dy)

    def translate_fn(self, x, generator=None):
        # as the original: a horizontal (width) shift only
        W = x.shape[3]
        sw = int(W * self.ratio_crop_pad + 0.5)
        dy = _randint(-sw, sw + 1, (self._n(x), 1, 1), x, generator)
        return _shift(x, torch.zeros_like(dy), dy)

    def cutout_fn(self, x, generator=None):
        # zero a (ratio * H) x (ratio * W) box whose centre is uniform; the box is clipped at the
        # border (the original clamps indices to the edge, which zeroes the same pixels)
        N, _, H, W = x.shape
        ch, cw = int(H * self.ratio_cutout + 0.5), int(W * self.ratio_cutout + 0.5)
        cy = _randint(0, H + (1 - ch % 2), (self._n(x), 1, 1), x, generator)
        cx = _randint(0, W + (1 - cw % 2), (self._n(x), 1, 1), x, generator)
        top, left = cy - ch // 2, cx - cw // 2
        rows = torch.arange(H, device=x.device).view(1, H, 1)
        cols = torch.arange(W, device=x.device).view(1, 1, W)
        inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
        mask = (~inside).to(x.dtype).unsqueeze(1)  # (n, 1, H, W)
        return x * mask


class Normalize:
    """(x - mean) / std per channel, on x's device and dtype (constants cached per pair)."""

    def __init__(self, mean, std):
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self._cache = {}

    def __repr__(self):
        return f'Normalize(mean={self.mean}, std={self.std})'

    def _stats(self, x):
        key = (x.device, x.dtype)
        if key not in self._cache:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            self._cache[key] = (mean, std)
        return self._cache[key]

    def __call__(self, x, generator=None):
        # `generator` is accepted (and unused) so that Compose can pass it to every step.
        mean, std = self._stats(x)
        return (x - mean) / std


class Compose:
    """Apply transforms in order; each is called as t(x, generator=generator)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __repr__(self):
        return 'Compose(' + ', '.join(repr(t) for t in self.transforms) + ')'

    def __call__(self, x, generator=None):
        for t in self.transforms:
            x = t(x, generator=generator)
        return x


def build_match_aug(aug_type, mean, std):
    """Matching augmentation: normalize, then one DSA draw shared by the whole batch."""
    return Compose([Normalize(mean, std), DiffAug(aug_type, batch=True)])


def build_net_aug(aug_type, mean, std, mixup_net):
    """Network-update augmentation: normalize, then per-sample DSA. CutMix replaces cutout."""
    if mixup_net == 'cut':
        aug_type = remove_aug(aug_type, 'cutout')
    return Compose([Normalize(mean, std), DiffAug(aug_type, batch=False)])
