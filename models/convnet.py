"""ConvNet, the default network of dataset condensation.

depth x [conv3x3, norm, activation, pooling], then one Linear layer on the flattened features.
Modules live in `self.layers`, a ModuleDict of four ModuleLists ('conv', 'norm', 'act', 'pool'),
so the state_dict keys are the original's (`layers.conv.0.weight`, `layers.norm.0.bias`,
`classifier.weight`, ...) and its checkpoints load unchanged.
"""
import torch.nn as nn

NORMS = ('instance', 'batch', 'layer', 'group', 'none')
ACTIVATIONS = ('relu', 'sigmoid', 'leakyrelu')
POOLINGS = ('avgpooling', 'maxpooling', 'none')


def _check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def _activation(net_act):
    if net_act == 'relu':
        return nn.ReLU()
    if net_act == 'sigmoid':
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01)


def _pooling(net_pooling):
    if net_pooling == 'maxpooling':
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.AvgPool2d(kernel_size=2, stride=2)


def _norm_layer(net_norm, shape):
    """Normalization for a conv output of shape (C, H, W); LayerNorm needs all three."""
    channels = shape[0]
    if net_norm == 'batch':
        return nn.BatchNorm2d(channels)
    if net_norm == 'layer':
        return nn.LayerNorm(list(shape))
    if net_norm == 'instance':
        # Instance norm written as one group per channel: affine weights are per channel and
        # there are no running statistics, so train and eval modes behave the same.
        return nn.GroupNorm(channels, channels, affine=True)
    return nn.GroupNorm(4, channels, affine=True)  # 'group'


class ConvNet(nn.Module):
    def __init__(self,
                 num_classes,
                 net_norm='instance',
                 net_depth=3,
                 net_width=128,
                 channel=3,
                 net_act='relu',
                 net_pooling='avgpooling',
                 im_size=(32, 32)):
        super().__init__()
        _check_choice('net_norm', net_norm, NORMS)
        _check_choice('net_act', net_act, ACTIVATIONS)
        _check_choice('net_pooling', net_pooling, POOLINGS)
        self.depth = net_depth
        self.net_norm = net_norm
        self.net_pooling = net_pooling

        self.layers, feat_shape = self._make_layers(channel, net_width, net_depth, net_norm, net_act,
                                                    net_pooling, im_size)
        num_feat = feat_shape[0] * feat_shape[1] * feat_shape[2]
        self.classifier = nn.Linear(num_feat, num_classes)

    @staticmethod
    def _make_layers(channel, net_width, net_depth, net_norm, net_act, net_pooling, im_size):
        """Build the blocks and return them with the (C, H, W) shape of the last block's output."""
        layers = {'conv': [], 'norm': [], 'act': [], 'pool': []}
        in_channels, (h, w) = channel, im_size
        for d in range(net_depth):
            # 1-channel data (MNIST, FashionMNIST) is 28 px: padding 3 makes the first feature
            # map 32 x 32, so the network has the same shapes as on 32 px data.
            pad = 3 if channel == 1 and d == 0 else 1
            layers['conv'].append(nn.Conv2d(in_channels, net_width, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if net_norm != 'none':
                layers['norm'].append(_norm_layer(net_norm, (net_width, h, w)))
            layers['act'].append(_activation(net_act))
            if net_pooling != 'none':
                layers['pool'].append(_pooling(net_pooling))
                h, w = h // 2, w // 2
            in_channels = net_width

        modules = nn.ModuleDict({key: nn.ModuleList(mods) for key, mods in layers.items()})
        return modules, (net_width, h, w)

    def _block(self, x, d):
        """Block d: conv, norm, activation, pooling.  (N, C, H, W) -> (N, width, H', W')"""
        x = self.layers['conv'][d](x)
        if len(self.layers['norm']) > 0:
            x = self.layers['norm'][d](x)
        x = self.layers['act'][d](x)
        if len(self.layers['pool']) > 0:
            x = self.layers['pool'][d](x)
        return x

    def forward(self, x, return_features=False):
        for d in range(self.depth):
            x = self._block(x, d)
        feat = x.flatten(1)  # (N, C * H' * W')
        logit = self.classifier(feat)  # (N, nclass)
        if return_features:
            return logit, feat
        return logit

    def get_feature(self, x, idx_from, idx_to=-1):
        """Outputs of blocks idx_from..idx_to (inclusive; idx_to=-1 means idx_from only).

        Returns a list of (N, width, H_d, W_d) tensors. Blocks after idx_to are not computed.
        """
        if idx_to == -1:
            idx_to = idx_from
        features = []
        for d in range(min(self.depth, idx_to + 1)):
            x = self._block(x, d)
            features.append(x)
        return features[idx_from:idx_to + 1]
