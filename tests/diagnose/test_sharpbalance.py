"""SharpBalance: the SAM / combined steps against hand-written references (float64), the
vmap scores against a loop, the subset split's laws, the metrics, and a short digits run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from steps.core.data import digits_images, labelled_dataset
from steps.core.factory import build_model
from steps.diagnose.sharpbalance import (
    GRAD_NORM_EPS,
    SAM,
    EnsembleConfig,
    MemberSplit,
    check_partition,
    combined_step,
    corruption_metrics,
    ensemble_metrics,
    gaussian_blur,
    member_probabilities,
    per_sample_cross_entropy,
    per_sample_scores,
    reference_split_rule,
    select_subset,
    sharpbalance_splits,
    sharpness,
    train_ensemble,
)

LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=gen))


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _reference_sgd_steps(model, batches):
    opt = _sgd(model)
    for x, y in batches:
        opt.zero_grad()
        _mean_loss(model, x, y).backward()
        opt.step()


def _reference_sam_steps(model, batches, rho, adaptive=False):
    """SAM written out: e = rho T^2 g / ||T g|| (T = |w| if adaptive else 1), grad at w + e."""
    opt = _sgd(model)
    params = list(model.parameters())
    for x, y in batches:
        g = torch.autograd.grad(_mean_loss(model, x, y), params)
        t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g, strict=True)))
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ti, gi in zip(params, t, g, strict=True):
                p.add_(rho * ti**2 * gi / (norm + GRAD_NORM_EPS))
        g_adv = torch.autograd.grad(_mean_loss(model, x, y), params)
        with torch.no_grad():
            for p, wi in zip(params, w, strict=True):
                p.copy_(wi)
        for p, gi in zip(params, g_adv, strict=True):
            p.grad = gi
        opt.step()


def _combined_steps(model, batches, rho, mask_fn, adaptive=False):
    sam = SAM(_sgd(model), rho=rho, adaptive=adaptive)
    for x, y in batches:
        combined_step(model, sam, x, y, mask_fn(len(y)))


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


BATCHES = [_batch(s) for s in range(3)]  # three steps: momentum state matters too


def test_combined_step_with_an_empty_sam_set_is_an_sgd_step():
    ref, ours = _net(), _net()
    _reference_sgd_steps(ref, BATCHES)
    _combined_steps(ours, BATCHES, 0.2, lambda n: torch.zeros(n, dtype=torch.bool))
    assert _max_diff(ref, ours) <= 1e-12
    assert _max_diff(ref, _net()) > 1e-3  # the steps moved the weights


@pytest.mark.parametrize("adaptive", [False, True])
def test_combined_step_with_an_empty_normal_set_is_a_sam_step(adaptive):
    ref, ours, via_class = _net(), _net(), _net()
    _reference_sam_steps(ref, BATCHES, 0.2, adaptive)
    _combined_steps(ours, BATCHES, 0.2, lambda n: torch.ones(n, dtype=torch.bool), adaptive)
    sam = SAM(_sgd(via_class), rho=0.2, adaptive=adaptive)
    for x, y in BATCHES:
        sam.step(lambda x=x, y=y: _mean_loss(via_class, x, y))
    assert _max_diff(ref, ours) <= 1e-12
    assert _max_diff(ref, via_class) <= 1e-12
    sgd = _net()
    _reference_sgd_steps(sgd, BATCHES)
    assert _max_diff(ref, sgd) > 1e-4  # SAM differs from SGD at rho = 0.2


def test_rho_zero_is_sgd():
    ref, ours = _net(), _net()
    _reference_sgd_steps(ref, BATCHES)
    _combined_steps(ours, BATCHES, 0.0, lambda n: torch.ones(n, dtype=torch.bool))
    assert _max_diff(ref, ours) <= 1e-12


def test_mixed_step_adds_the_sgd_gradient_at_w_and_the_sam_gradient_at_w_plus_e():
    x, y = _batch(7)
    mask = torch.arange(len(y)) % 3 == 0
    ours, ref = _net(), _net()
    combined_step(ours, SAM(torch.optim.SGD(ours.parameters(), lr=LR), rho=0.3), x, y, mask)
    params = list(ref.parameters())

    def part(m):
        return nn.functional.cross_entropy(ref(x[m]), y[m], reduction="sum") / len(y)

    g_normal = torch.autograd.grad(part(~mask), params)
    g_sam = torch.autograd.grad(part(mask), params)  # the perturbation uses this part only
    norm = math.sqrt(sum(float((g**2).sum()) for g in g_sam))
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g_sam, strict=True):
            p.add_(0.3 * g / (norm + GRAD_NORM_EPS))
    g_adv = torch.autograd.grad(part(mask), params)
    with torch.no_grad():
        for p, wi, gn, ga in zip(params, w, g_normal, g_adv, strict=True):
            p.copy_(wi - LR * (gn + ga))
    assert _max_diff(ref, ours) <= 1e-12


def test_vmap_scores_equal_a_per_sample_loop():
    model = _net(3)
    x, y = _batch(3, n=37)
    scores = per_sample_scores(model, x, y, batch_size=10)  # uneven last batch
    params = list(model.parameters())
    for i in range(len(y)):
        loss = per_sample_cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum()
        expected = sum(float((g**2).sum()) for g in torch.autograd.grad(loss, params))
        assert scores[i] == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert scores.std() > 0


def test_scores_run_in_eval_mode_with_batchnorm_and_restore_the_mode():
    model = build_model("cnn", seed=0).double().train()
    x = torch.from_numpy(digits_images(labelled_dataset("digits").x_train[:5])).double()
    scores = per_sample_scores(model, x, torch.arange(5))
    assert model.training and scores.shape == (5,) and np.all(np.isfinite(scores))
    model.eval()
    params = list(model.parameters())
    loss = per_sample_cross_entropy(model(x[2:3]), torch.tensor([2])).sum()
    expected = sum(float((g**2).sum()) for g in torch.autograd.grad(loss, params))
    assert scores[2] == pytest.approx(expected, rel=1e-10)


def test_direction_picks_the_highest_or_lowest_scores():
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0])
    assert select_subset(scores, 0.5, "sharpest").tolist() == [0, 2, 4, 6]
    assert select_subset(scores, 0.5, "flattest").tolist() == [1, 3, 5, 7]
    assert select_subset(scores, 0.25, "sharpest").tolist() == [2, 6]
    with pytest.raises(ValueError, match="direction"):
        select_subset(scores, 0.5, "random")


def test_splits_follow_the_rule_on_a_hand_worked_example():
    # N = 8, k = 50 % (4 each). Member 0 selects {0,1,2,3}, 1 {2,3,4,5}, 2 {0,3,4,5}
    # (highest scores); nobody selects {6, 7}: member 0 gets 6, member 1 gets 7, member 2 none.
    s0 = np.array([9, 9, 9, 9, 1, 1, 1, 1.0])
    s1 = np.array([1, 1, 9, 9, 9, 9, 1, 1.0])
    s2 = np.array([9, 1, 1, 9, 9, 9, 1, 1.0])
    splits = sharpbalance_splits([s0, s1, s2], 0.5, "sharpest")
    assert splits[0].sam.tolist() == [0, 2, 3, 4, 5, 6]
    assert splits[0].normal.tolist() == [1, 7]
    assert splits[1].sam.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert splits[2].sam.tolist() == [0, 1, 2, 3, 4, 5]
    flipped = sharpbalance_splits([-s0, -s1, -s2], 0.5, "flattest")
    assert all(np.array_equal(a.sam, b.sam) for a, b in zip(splits, flipped, strict=True))


# --- ports of the released split rules (haiquanlu/SharpBalance engine.py,
# boosting_sam_split and boosting_sam_split_boost with ascend=True, as main.py calls them),
# written from the reference code; they return the member's SGD ("normal") indices. ---

def _ref_selected(flat, ratio):
    return np.argsort(flat)[:int(flat.shape[0] * ratio)]


def _ref_split(flats, i, ratio, boost):
    normal = np.arange(flats[0].shape[0])
    sam = np.array([])
    for j in flats:
        if j != i:
            sam = np.union1d(sam, _ref_selected(flats[j], ratio))
    sharp = np.array([])
    for j in flats:
        sharp = np.union1d(sharp, _ref_selected(flats[j], ratio))
    flat_indice = sorted(set(normal) - set(sharp))
    flat_split = flat_indice[i::len(flats)]
    if boost:
        sharp = np.union1d(sam, sorted(set(flat_indice) - set(flat_split)))
    else:
        sharp = np.union1d(sam, flat_split)
    return sorted(set(normal) - set(sharp))


@pytest.mark.parametrize("rule", ["share", "boost"])
@pytest.mark.parametrize("members,fraction,n", [(3, 0.5, 200), (2, 0.3, 101), (5, 0.1, 97)])
def test_split_rules_equal_the_released_code(rule, members, fraction, n):
    rng = np.random.default_rng(members + n)
    scores = [rng.standard_normal(n) for _ in range(members)]
    splits = sharpbalance_splits(scores, fraction, "flattest", rule)
    flats = dict(enumerate(scores))
    for i, split in enumerate(splits):
        assert split.normal.tolist() == _ref_split(flats, i, fraction, rule == "boost")


def test_the_split_rule_is_chosen_by_dataset_as_the_reference_does():
    assert reference_split_rule("cifar10") == "boost"
    assert reference_split_rule("cifar100") == "share"
    assert reference_split_rule("digits") == "share"
    assert EnsembleConfig().dataset == "cifar10" and EnsembleConfig().split_rule is None


@pytest.mark.parametrize("members,fraction", [(1, 0.5), (2, 0.3), (3, 0.5), (5, 0.1)])
def test_splits_partition_the_data(members, fraction):
    rng = np.random.default_rng(members)
    scores = [rng.standard_normal(101) for _ in range(members)]
    splits = sharpbalance_splits(scores, fraction, "flattest")
    chosen = [set(select_subset(s, fraction, "flattest").tolist()) for s in scores]
    unselected = set(range(101)) - set().union(*chosen)
    shares = []
    for i, split in enumerate(splits):
        assert not set(split.sam.tolist()) & set(split.normal.tolist())
        assert set(split.sam.tolist()) | set(split.normal.tolist()) == set(range(101))
        others = set().union(*(c for j, c in enumerate(chosen) if j != i))
        assert others <= set(split.sam.tolist())
        shares.append(set(split.sam.tolist()) - others)
        assert shares[-1] <= unselected
    assert set().union(*shares) == unselected  # the unselected samples are shared out ...
    assert sum(map(len, shares)) == len(unselected)  # ... each to exactly one member


def test_check_partition_rejects_overlaps_and_gaps():
    with pytest.raises(AssertionError):
        check_partition(MemberSplit(np.array([0, 1]), np.array([1, 2])), 3)
    with pytest.raises(AssertionError):
        check_partition(MemberSplit(np.array([0]), np.array([2])), 3)
    check_partition(MemberSplit(np.array([0, 2]), np.array([1])), 3)


def test_disagreement_and_variance_of_identical_and_of_known_members():
    x, y = _batch(4, n=50)
    same = ensemble_metrics(member_probabilities([_net(1)] * 3, x), y)
    assert same.disagreement == 0.0 and same.output_variance == pytest.approx(0.0, abs=1e-30)
    assert same.ensemble_accuracy == same.member_accuracy
    # Two members, 4 samples, 2 classes: they disagree on samples 2 and 3.
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],
                          [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]]], dtype=torch.float64)
    known = ensemble_metrics(probs, torch.tensor([0, 0, 1, 1]))
    assert known.member_accuracies == (0.75, 0.75)
    assert known.disagreement == 0.5
    assert known.disagreement_error_ratio == pytest.approx(0.5 / 0.25)
    assert known.ensemble_accuracy == 0.75  # means: [.8 .2] [.7 .3] [.6 .4] [.4 .6]
    # Variance over the two members, summed over the two classes (ddof 0): 2 * (d / 2)^2.
    diffs = torch.tensor([0.2, 0.2, 0.6, 0.4], dtype=torch.float64)
    assert known.output_variance == pytest.approx(float((2 * (diffs / 2) ** 2).mean()))


def test_blur_keeps_constant_images_and_smooths_an_impulse():
    flat = torch.full((2, 1, 8, 8), 3.0, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-12)
    impulse = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    impulse[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(impulse, 1.0)
    assert blurred.shape == impulse.shape
    assert 0 < blurred[0, 0, 4, 4] < 1 and blurred[0, 0, 4, 5] > 0
    assert blurred.sum() == pytest.approx(1.0)  # no mass reaches the border at sigma 1


def test_short_sharpbalance_run_on_digits():
    data = labelled_dataset("digits", seed=0)
    x = torch.from_numpy(digits_images(data.x_train))
    y = torch.from_numpy(data.y_train)
    config = EnsembleConfig(members=3, epochs=4, seed=0)
    ensemble = train_ensemble(lambda s: build_model("mlp", seed=s), x, y, config)
    assert len(ensemble.models) == 3 and len(ensemble.splits) == 3
    for split in ensemble.splits:
        check_partition(split, len(y))
        assert 0 < len(split.normal) < len(y)
    # Members differ (different seeds, different SAM subsets).
    assert any(not torch.equal(p, q) for p, q in zip(ensemble.models[0].parameters(),
                                                      ensemble.models[1].parameters(),
                                                      strict=True))
    x_test, y_test = torch.from_numpy(digits_images(data.x_test)), torch.from_numpy(data.y_test)
    results = corruption_metrics(ensemble.models, x_test, y_test, torch.Generator().manual_seed(0))
    clean = results["clean"]
    assert clean.ensemble_accuracy >= clean.member_accuracy - 0.01
    assert clean.member_accuracy > 0.5  # learnt something (chance is 0.1)
    for metrics in results.values():
        values = [metrics.ensemble_accuracy, metrics.member_accuracy, metrics.disagreement,
                  metrics.disagreement_error_ratio, metrics.output_variance]
        assert all(math.isfinite(v) for v in values)
    assert clean.disagreement > 0
    sub = x[:20], y[:20]
    worst = [sharpness(m, *sub, rho=0.2) for m in ensemble.models]
    average = [sharpness(m, *sub, rho=0.05, kind="average", norm="linf",
                         generator=torch.Generator().manual_seed(0)) for m in ensemble.models]
    assert all(math.isfinite(s) and s >= 0 for s in worst)
    assert all(math.isfinite(s) for s in average)
    again = train_ensemble(lambda s: build_model("mlp", seed=s), x, y, config)  # deterministic
    assert all(torch.equal(p, q) for a, b in zip(ensemble.models, again.models, strict=True)
               for p, q in zip(a.parameters(), b.parameters(), strict=True))
