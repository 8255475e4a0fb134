"""DenseNet for CIFAR (the DenseNet-BC variant of kuangliu/pytorch-cifar, as the original uses).

`densenet_cifar`: bottleneck dense layers, growth rate 12, blocks [6, 12, 24, 16], transitions
halving the channels. Module names follow the original (`conv1`, `dense1.0.bn1`, `trans1.conv`,
`bn`, `linear`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    """BN-ReLU-1x1 conv (4 * growth) - BN-ReLU-3x3 conv (growth); output concatenated to input."""

    def __init__(self, in_planes, growth_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)  # (N, C + growth, H, W)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv, then 2x2 average pooling."""

    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(self, block, nblocks, growth_rate=12, reduction=0.5, num_classes=10, nch=3):
        super().__init__()
        self.growth_rate = growth_rate
        num_planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(nch, num_planes, kernel_size=3, padding=1, bias=False)

        self.dense1, num_planes = self._make_dense_layers(block, num_planes, nblocks[0])
        self.trans1, num_planes = self._make_transition(num_planes, reduction)
        self.dense2, num_planes = self._make_dense_layers(block, num_planes, nblocks[1])
        self.trans2, num_planes = self._make_transition(num_planes, reduction)
        self.dense3, num_planes = self._make_dense_layers(block, num_planes, nblocks[2])
        self.trans3, num_planes = self._make_transition(num_planes, reduction)
        self.dense4, num_planes = self._make_dense_layers(block, num_planes, nblocks[3])

        self.bn = nn.BatchNorm2d(num_planes)
        self.linear = nn.Linear(num_planes, num_classes)

    def _make_dense_layers(self, block, in_planes, nblock):
        """Returns the dense block and its number of output channels."""
        layers = []
        for _ in range(nblock):
            layers.append(block(in_planes, self.growth_rate))
            in_planes += self.growth_rate
        return nn.Sequential(*layers), in_planes

    @staticmethod
    def _make_transition(in_planes, reduction):
        out_planes = int(math.floor(in_planes * reduction))
        return Transition(in_planes, out_planes), out_planes

    def forward(self, x):
        out = self.conv1(x)  # (N, 2 * growth, H, W)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = F.relu(self.bn(self.dense4(out)))  # (N, C, H / 8, W / 8)
        # Global average pooling: the original's avg_pool2d(out, 4) on 32 px input (4 x 4 maps),
        # and still defined on 28 px input (3 x 3 maps).
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, C)
        return self.linear(out)


def densenet_cifar(nclass, nch=3):
    return DenseNet(Bottleneck, [6, 12, 24, 16], growth_rate=12, num_classes=nclass, nch=nch)
