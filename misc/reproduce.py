"""The paper's settings (`--reproduce`), kept as data.

`preset(dataset, factor, ipc, nclass)` returns the values the original's misc/reproduce.py sets for
that run. argument.py applies them below any flag given on the command line.
"""


def preset(dataset, factor, ipc, nclass):
    """Settings that reproduce the published condensed data for one configuration."""
    if dataset == 'imagenet':
        values = {'net_type': 'resnet_ap', 'depth': 10, 'niter': 500, 'n_data': 500}
        if nclass == 10:
            # The 10-class subset pretrains every condensation network for 10 epochs.
            values.update(metric='l1', lr_img=3e-3, early=10)
        elif nclass == 100:
            values.update(metric='l1', lr_img=1e-3)
        if factor >= 3 and ipc >= 20:
            # Bounds the decoded batch so that it fits in memory.
            values['decode_type'] = 'bound'
        return values

    values = {'net_type': 'convnet', 'depth': 3, 'niter': 2000, 'n_data': 500}
    if dataset in ('cifar10', 'cifar100'):
        values.update(metric='mse', lr_img=5e-3, n_data=2000)
    elif dataset == 'svhn':
        values.update(metric='mse', lr_img=5e-3)
        values.update(eval_overrides(dataset, factor, ipc))
    elif dataset == 'mnist':
        values.update(metric='l1', lr_img=1e-4)
        if factor > 1:
            # CutMix and cutout do not help on multi-formed MNIST.
            values.update(aug_type='color_crop', mixup_net='vanilla')
        values.update(eval_overrides(dataset, factor, ipc))
    elif dataset == 'fashion':
        values.update(metric='l1', lr_img=1e-4)
    else:
        raise ValueError(f"no --reproduce preset for dataset '{dataset}'")
    return values


def eval_overrides(dataset, factor, ipc):
    """Evaluation settings the original uses for some runs; test.py applies them even without
    --reproduce."""
    if dataset == 'svhn' and factor == 1 and ipc == 1:
        # Without mixing, evaluation on one image per class is much better.
        return {'mixup': 'vanilla', 'dsa_strategy': 'color_crop_cutout_scale_rotate'}
    if dataset == 'mnist' and factor > 1:
        return {'mixup': 'vanilla', 'dsa_strategy': 'color_crop_scale_rotate'}
    return {}
