"""Model registry: network name -> constructor.

Every constructor takes the same keyword arguments
    (nclass, nch, size, depth, width, norm_type, dataset)
and uses the ones its network needs, so condense.py, test.py and train.py build any network
through `get_model` alone (the original's `define_model`).
"""
from .convnet import ConvNet
from .densenet_cifar import DenseNet, densenet_cifar
from .efficientnet import efficientnet_b0
from .resnet import ResNet
from .resnet_ap import ResNetAP

__all__ = ['MODELS', 'register', 'get_model', 'ConvNet', 'ResNet', 'ResNetAP', 'DenseNet']

MODELS = {}


def register(name):
    """Decorator adding `constructor(nclass, nch, size, depth, width, norm_type, dataset)`."""

    def add(constructor):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = constructor
        return constructor

    return add


def get_model(name, nclass, nch=3, size=32, depth=3, width=1.0, norm_type='instance',
              dataset='cifar10'):
    """Build network `name` for `nclass` classes on (nch, size, size) inputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](nclass=nclass, nch=nch, size=size, depth=depth, width=width,
                        norm_type=norm_type, dataset=dataset)


@register('convnet')
def _convnet(nclass, nch, size, depth, width, norm_type, dataset):
    return ConvNet(nclass, net_norm=norm_type, net_depth=depth, net_width=int(128 * width),
                   channel=nch, im_size=(size, size))


@register('resnet')
def _resnet(nclass, nch, size, depth, width, norm_type, dataset):
    return ResNet(dataset, depth, nclass, norm_type=norm_type, size=size, nch=nch)


@register('resnet_ap')
def _resnet_ap(nclass, nch, size, depth, width, norm_type, dataset):
    return ResNetAP(dataset, depth, nclass, width=width, norm_type=norm_type, size=size, nch=nch)


@register('densenet')
def _densenet(nclass, nch, size, depth, width, norm_type, dataset):
    return densenet_cifar(nclass, nch=nch)


@register('efficient')
def _efficient(nclass, nch, size, depth, width, norm_type, dataset):
    return efficientnet_b0(nclass, nch=nch, size=size)
