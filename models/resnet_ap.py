"""ResNetAP: ResNet whose downsampling is average pooling instead of strided convolution.

IDC's network for ImageNet condensation. Same layout as resnet.py (and shares its base class);
the differences, all as in the original:
- every conv has stride 1; a stride-s block average-pools (kernel s) after its first ReLU and
  its shortcut is [1x1 conv, AvgPool(s), norm];
- the stem pools with AvgPool (4 for 'large' after a stride-1 7x7 conv, 2 for 'mid');
- norm_type may also be 'sn' (spectral norm on the 3x3/7x7/shortcut convs, no norm layer)
  or 'none'; both give those convs a bias;
- the ImageNet widths scale with `width` (64 * width at the first stage).
"""
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

from .resnet import (ResNetBase, IntroBlock, init_weights, normalization, check_norm_type,
                     stem_size)

NORM_TYPES = ('batch', 'instance', 'sn', 'none')

# The original used torch.nn.utils.spectral_norm, which stores a conv's weight as weight_orig,
# weight_u and weight_v; torch.nn.utils.parametrizations.spectral_norm (used here) names them:
_OLD_SPECTRAL_NORM_KEYS = {
    'weight_orig': 'parametrizations.weight.original',
    'weight_u': 'parametrizations.weight.0._u',
    'weight_v': 'parametrizations.weight.0._v',
}


def _rename_old_spectral_norm_keys(module, state_dict, prefix, *args):
    """Load-state-dict pre-hook: lets checkpoints of the original's 'sn' networks load."""
    for old, new in _OLD_SPECTRAL_NORM_KEYS.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def conv_stride1(in_planes, out_planes, kernel_size=3, norm_type='instance'):
    """Stride-1 'same' conv; without a norm layer after it ('sn', 'none') it gets a bias."""
    bias = norm_type in ('sn', 'none')
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=1,
                     padding=kernel_size // 2, bias=bias)
    if norm_type == 'sn':
        conv = parametrizations.spectral_norm(conv)
        conv.register_load_state_dict_pre_hook(_rename_old_spectral_norm_keys)
    return conv


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, norm_type='batch', stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv_stride1(inplanes, planes, kernel_size=3, norm_type=norm_type)
        self.bn1 = normalization(planes, norm_type)
        self.conv2 = conv_stride1(planes, planes, kernel_size=3, norm_type=norm_type)
        self.bn2 = normalization(planes, norm_type)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=self.stride, stride=self.stride)
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    # As in the original, the bottleneck's own convs are plain (no spectral norm, no bias).
    expansion = 4

    def __init__(self, inplanes, planes, norm_type='batch', stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = normalization(planes, norm_type)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = normalization(planes, norm_type)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = normalization(planes * self.expansion, norm_type)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=self.stride, stride=self.stride)
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNetAP(ResNetBase):
    block_classes = {'basic': BasicBlock, 'bottleneck': Bottleneck}

    def __init__(self, dataset, depth, num_classes, width=1.0, norm_type='batch', size=-1, nch=3):
        super().__init__()
        check_norm_type(norm_type, NORM_TYPES)
        self.dataset = dataset
        self.norm_type = norm_type
        self.nch = nch
        self.net_size = stem_size(dataset, size)

        if dataset.startswith('cifar'):
            # The CIFAR network ignores `width`, as in the original.
            n = self._cifar_blocks_per_stage(depth)
            widths, counts, block = [32, 64, 128, 256], [n] * 4, BasicBlock
        else:
            block, counts = self._block_for_depth(depth)
            nc = int(64 * width)
            widths = [nc, nc * 2, nc * 4, nc * 8]

        self.inplanes = widths[0]
        self.layer0 = self._intro_block(nch, widths[0])
        self.layer1 = self._make_layer(block, widths[0], counts[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], counts[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], counts[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], counts[3], stride=2)
        self.fc = nn.Linear(self.inplanes, num_classes)
        init_weights(self)

    def _intro_block(self, nch, planes):
        kernel_size = 7 if self.net_size == 'large' else 3
        conv = conv_stride1(nch, planes, kernel_size=kernel_size, norm_type=self.norm_type)
        pool = None
        if self.net_size == 'large':
            pool = nn.AvgPool2d(kernel_size=4, stride=4)
        elif self.net_size == 'mid':
            pool = nn.AvgPool2d(kernel_size=2, stride=2)
        return IntroBlock(conv, normalization(planes, self.norm_type), pool)

    def _downsample(self, inplanes, outplanes, stride):
        # Kept as [conv, pool, norm] even for stride 1 so the norm is always index 2, as in
        # the original's checkpoints (`downsample.2.weight`).
        return nn.Sequential(
            conv_stride1(inplanes, outplanes, kernel_size=1, norm_type=self.norm_type),
            nn.AvgPool2d(kernel_size=stride, stride=stride),
            normalization(outplanes, self.norm_type),
        )
