"""EfficientNet-B0 from efficientnet_pytorch, an ImageNet evaluation network in the original."""


def efficientnet_b0(nclass, nch=3, size=224):
    # Imported here, not at module level: only ImageNet evaluation needs the package, and
    # `import models` stays light.
    from efficientnet_pytorch import EfficientNet

    # from_name builds a randomly initialised network; it never downloads weights.
    # Its convs use TensorFlow-style 'same' padding fixed in advance for `image_size`; B0's
    # default is 224 (the original's only use), and tiny inputs such as 28 px crash with
    # paddings computed for 224, so the padding follows the real input size.
    # nch=3 and size=224 build exactly the original's network.
    return EfficientNet.from_name('efficientnet-b0', num_classes=nclass, in_channels=nch,
                                  image_size=size)
