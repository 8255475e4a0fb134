"""coreset.py: random and herding selection."""
import pytest
import torch

from coreset import get_features, herding_select, random_select
from misc.utils import UserError
from models import get_model


def test_random_select_takes_the_first_ipc_of_each_class_class_major():
    targets = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0])
    idx = random_select(targets, 2, 3)
    assert idx.tolist() == [1, 3, 2, 5, 0, 4]
    assert targets[idx].tolist() == [0, 0, 1, 1, 2, 2]


def test_random_select_with_seed_is_a_reproducible_draw():
    targets = torch.arange(10).repeat(50)
    a, b = random_select(targets, 5, 10, seed=1), random_select(targets, 5, 10, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_select(targets, 5, 10))
    assert not torch.equal(a, random_select(targets, 5, 10, seed=2))
    assert (torch.bincount(targets[a]) == 5).all() and len(set(a.tolist())) == 50
    rng_before = torch.get_rng_state()
    random_select(targets, 5, 10, seed=3)
    assert torch.equal(rng_before, torch.get_rng_state())  # a local generator


def test_too_few_images_is_a_user_error():
    with pytest.raises(UserError, match='class 1 has only 1'):
        random_select(torch.tensor([0, 0, 1]), 2, 2)


def test_herding_follows_the_class_mean():
    # class 0: features on a line; the mean is 0, so herding picks 0 first, then the pair
    # that keeps the running mean closest to it.
    feats = torch.tensor([[-3.0], [0.1], [3.0], [1.0], [-1.0], [10.0], [11.0], [12.0]])
    targets = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    idx = herding_select(feats, targets, 3, 2)
    assert idx[:3].tolist() == [1, 4, 3]  # 0.1, then -1.0 (sum -0.9 vs target 0), then 1.0
    assert idx[3:].tolist() == [6, 5, 7]
    assert len(set(idx.tolist())) == 6


def test_herding_never_repeats_and_beats_random_at_matching_the_mean():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(600, 16, generator=g) + torch.arange(3).repeat_interleave(200)[:, None]
    targets = torch.arange(3).repeat_interleave(200)
    idx = herding_select(feats, targets, 10, 3)
    assert len(set(idx.tolist())) == 30
    assert (targets[idx] == torch.arange(3).repeat_interleave(10)).all()
    for c in range(3):
        mean = feats[targets == c].mean(0)
        herd = (feats[idx[c * 10:(c + 1) * 10]].mean(0) - mean).norm()
        first = (feats[random_select(targets, 10, 3)[c * 10:(c + 1) * 10]].mean(0) - mean).norm()
        assert herd < first


def test_get_features_of_a_middle_layer():
    model = get_model('convnet', 10, nch=1, size=28, depth=3, width=0.125, dataset='fashion')
    batches = [(torch.rand(5, 1, 28, 28), torch.arange(5)), (torch.rand(3, 1, 28, 28),
                                                               torch.arange(3))]
    feats, labels = get_features(model, batches, 2)
    assert feats.shape == (8, 16 * 4 * 4) and labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert not model.training
