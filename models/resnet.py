"""ResNet as in the original IDC code (itself adapted from torchvision).

Two families, chosen by dataset name as the original does:
- 'cifar*': a narrow network, widths 32-64-128-256, (depth - 2) // 6 BasicBlocks per stage.
- anything else: the ImageNet network, widths 64-128-256-512, torchvision's block counts.
The stem follows the input size: 'small' (3x3 conv, no pooling) for CIFAR or size <= 64,
'mid' (3x3 conv + max-pool) for 64 < size <= 128, 'large' (7x7 stride-2 conv + max-pool) else.

`ResNetBase` holds what ResNet and ResNetAP (resnet_ap.py) share: the stage layout, forward,
get_feature and the weight initialisation. Module names follow the original (`layer0.conv1`,
`layer1.0.bn1`, `layer2.0.downsample.0`, `fc`), so its checkpoints load.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

# ImageNet-style block counts per stage, by depth.
STAGE_BLOCKS = {
    10: [1, 1, 1, 1],
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
    200: [3, 24, 36, 3],
}
BOTTLENECK_MIN_DEPTH = 50


def stem_size(dataset, size):
    """'small', 'mid' or 'large' stem for this dataset and input size (size <= 0: unknown)."""
    if dataset.startswith('cifar') or 0 < size <= 64:
        return 'small'
    if 64 < size <= 128:
        return 'mid'
    return 'large'


def normalization(planes, norm_type):
    if norm_type == 'batch':
        return nn.BatchNorm2d(planes)
    if norm_type == 'instance':
        return nn.GroupNorm(planes, planes)
    # 'sn' and 'none' (ResNetAP only): no normalization layer, and no state_dict entries.
    return nn.Identity()


def check_norm_type(norm_type, choices):
    if norm_type not in choices:
        raise ValueError(f"unknown norm_type {norm_type!r}; choose one of {', '.join(choices)}")


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IntroBlock(nn.Module):
    """Stem: conv, norm, ReLU, then the optional pooling (nn.Identity for the 'small' stem)."""

    def __init__(self, conv1, bn1, pool=None):
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.pool = pool if pool is not None else nn.Identity()

    def forward(self, x):
        return self.pool(self.relu(self.bn1(self.conv1(x))))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, norm_type='batch', stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = normalization(planes, norm_type)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = normalization(planes, norm_type)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, norm_type='batch', stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = normalization(planes, norm_type)
        self.conv2 = conv3x3(planes, planes, stride)
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
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def init_weights(model):
    """The original's initialisation: He-normal convs (fan-out), norm layers at weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            # A spectral-normalised conv stores its raw weight in parametrizations.weight.original.
            if parametrize.is_parametrized(m, 'weight'):
                weight = m.parametrizations.weight.original
            else:
                weight = m.weight
            with torch.no_grad():
                weight.normal_(0, math.sqrt(2. / n))
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBase(nn.Module):
    """layer0 (stem), layer1..layer4 (stages), global average pooling, fc.

    Subclasses set self.norm_type and self.inplanes, define `block_classes` and `_downsample`,
    then call `_make_layer` for each stage.
    """
    block_classes = {'basic': BasicBlock, 'bottleneck': Bottleneck}

    def _block_for_depth(self, depth):
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"invalid ResNet depth {depth}; choose one of {sorted(STAGE_BLOCKS)}")
        kind = 'bottleneck' if depth >= BOTTLENECK_MIN_DEPTH else 'basic'
        return self.block_classes[kind], STAGE_BLOCKS[depth]

    @staticmethod
    def _cifar_blocks_per_stage(depth):
        n = (depth - 2) // 6
        if n < 1:
            raise ValueError(f"invalid CIFAR ResNet depth {depth}; need depth >= 8")
        return n

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = self._downsample(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, norm_type=self.norm_type, stride=stride,
                        downsample=downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_type=self.norm_type))
        return nn.Sequential(*layers)

    def _downsample(self, inplanes, outplanes, stride):
        raise NotImplementedError

    def _stages(self):
        """The computation as a list of steps; get_feature numbers their outputs 0..6."""
        return [self.layer0, self.layer1, self.layer2, self.layer3, self.layer4,
                self._pool_flatten, self.fc]

    @staticmethod
    def _pool_flatten(x):
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, C, H, W) -> (N, C)

    def forward(self, x):
        for step in self._stages():
            x = step(x)
        return x  # (N, nclass)

    def get_feature(self, x, idx_from, idx_to=-1):
        """Outputs of steps idx_from..idx_to (inclusive; idx_to=-1 means idx_from only).

        0: stem (N, C0, H, W); 1-4: stages (N, C_k, H_k, W_k); 5: pooled (N, C4); 6: logits.
        Steps after idx_to are not computed.
        """
        if idx_to == -1:
            idx_to = idx_from
        features = []
        for step in self._stages()[:idx_to + 1]:
            x = step(x)
            features.append(x)
        return features[idx_from:idx_to + 1]


class ResNet(ResNetBase):
    def __init__(self, dataset, depth, num_classes, norm_type='batch', size=-1, nch=3):
        super().__init__()
        check_norm_type(norm_type, ('batch', 'instance'))
        self.dataset = dataset
        self.norm_type = norm_type
        self.net_size = stem_size(dataset, size)

        if dataset.startswith('cifar'):
            n = self._cifar_blocks_per_stage(depth)
            widths, counts, block = [32, 64, 128, 256], [n] * 4, BasicBlock
        else:
            block, counts = self._block_for_depth(depth)
            widths = [64, 128, 256, 512]

        self.inplanes = widths[0]
        self.layer0 = self._intro_block(nch, widths[0])
        self.layer1 = self._make_layer(block, widths[0], counts[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], counts[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], counts[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], counts[3], stride=2)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        init_weights(self)

    def _intro_block(self, nch, planes):
        if self.net_size == 'large':
            conv = nn.Conv2d(nch, planes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            conv = nn.Conv2d(nch, planes, kernel_size=3, stride=1, padding=1, bias=False)
        pool = None
        if self.net_size != 'small':
            pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        return IntroBlock(conv, normalization(planes, self.norm_type), pool)

    def _downsample(self, inplanes, outplanes, stride):
        return nn.Sequential(
            nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
            normalization(outplanes, self.norm_type),
        )
