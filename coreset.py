"""Coreset baselines: which real training images to keep, per class.

Each function takes labels (and features) and returns indices into the training set, class-major
(the ipc picks of class 0, then those of class 1, ...), so that the chosen images line up with
class-major targets as condensed data do. Loading networks and images is the caller's business
(test.py); `get_features` only runs a given network over given batches.
"""
import torch

from misc.utils import UserError


def _class_indices(targets, nclass, ipc):
    """Indices of each class in dataset order; every class must have at least ipc images."""
    targets = torch.as_tensor(targets).cpu()
    per_class = [(targets == c).nonzero().flatten() for c in range(nclass)]
    short = [(c, len(i)) for c, i in enumerate(per_class) if len(i) < ipc]
    if short:
        c, n = short[0]
        raise UserError(f'class {c} has only {n} training images; cannot select {ipc} per class '
                        f'({len(short)} class(es) too small)')
    return per_class


def random_select(targets, ipc, nclass, seed=None):
    """ipc images per class: the first ipc in dataset order (as the original), or a random draw
    of a local generator seeded by `seed` when one is given."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    picks = []
    for idx in _class_indices(targets, nclass, ipc):
        if g is None:
            picks.append(idx[:ipc])
        else:
            picks.append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
    return torch.cat(picks)


@torch.no_grad()
def get_features(model, batches, f_idx):
    """Flattened features (N, D) of layer `f_idx` (the networks' get_feature numbering) for every
    (x, y) batch, in order, with the model in eval mode; returned on the CPU with the labels."""
    model.eval()
    feats, labels = [], []
    for x, y in batches:
        f = model.get_feature(x, f_idx)[0]
        feats.append(f.flatten(1).float().cpu())  # (B, C * H * W)
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def herding_select(features, targets, ipc, nclass):
    """Herding (Welling 2009), per class: greedily add the sample that keeps the running mean of
    the chosen features closest to the class mean. features (N, D); returns class-major indices.

    Step k picks argmin_i ||(k + 1) * mean - (sum of chosen) - f_i|| among unchosen samples.
    """
    features = torch.as_tensor(features).float()
    picks = []
    for idx in _class_indices(targets, nclass, ipc):
        feat = features[idx]  # (n_c, D)
        mean = feat.mean(0)
        chosen_sum = torch.zeros_like(mean)
        taken = torch.zeros(len(idx), dtype=torch.bool)
        order = []
        for k in range(ipc):
            dist = torch.linalg.vector_norm((k + 1) * mean - chosen_sum - feat, dim=1)
            dist[taken] = float('inf')
            i = int(dist.argmin())
            taken[i] = True
            order.append(i)
            chosen_sum += feat[i]
        picks.append(idx[torch.tensor(order, dtype=torch.long)])
    return torch.cat(picks)
