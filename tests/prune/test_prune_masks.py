"""Pure mask functions: exact counts, deterministic ties, one global threshold, N:M groups."""

from __future__ import annotations

import pytest
import torch

from slimtorch.prune import check_sparsity, global_magnitude_masks, magnitude_mask, nm_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_magnitude_mask_prunes_exactly_round_sparsity_times_numel(sparsity: float) -> None:
    w = torch.randn(37, 11)
    mask = magnitude_mask(w, sparsity)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(sparsity * w.numel())
    # every pruned weight is no larger than every kept one
    if 0 < sparsity:
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_magnitude_mask_breaks_ties_by_index() -> None:
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, -1.0])
    assert magnitude_mask(w, 0.5).tolist() == [False, False, False, True, True, True]
    assert torch.equal(magnitude_mask(w, 0.5), magnitude_mask(w.clone(), 0.5))


def test_global_masks_exact_total_and_smaller_layer_loses_more() -> None:
    big = torch.linspace(1.0, 2.0, 100)  # all larger than every weight of `small`
    small = torch.linspace(0.01, 0.5, 50).view(5, 10)
    masks = global_magnitude_masks({"big": big, "small": small}, 0.4)
    total = sum(int((~m).sum()) for m in masks.values())
    assert total == round(0.4 * 150) == 60
    assert int((~masks["small"]).sum()) == 50  # all of the small layer goes first
    assert int((~masks["big"]).sum()) == 10
    assert masks["small"].shape == small.shape
    # the 10 pruned weights of `big` are its 10 smallest
    assert not masks["big"][:10].any() and masks["big"][10:].all()


def test_global_masks_with_one_threshold_across_layers() -> None:
    torch.manual_seed(1)
    weights = {"a": torch.randn(20, 20) * 0.1, "b": torch.randn(30, 7)}
    masks = global_magnitude_masks(weights, 0.7)
    pruned = torch.cat([weights[k].abs()[~masks[k]] for k in weights])
    kept = torch.cat([weights[k].abs()[masks[k]] for k in weights])
    assert pruned.max() <= kept.min()
    assert int((~masks["a"]).sum()) / 400 > int((~masks["b"]).sum()) / 210


def test_nm_mask_keeps_exactly_n_largest_per_group_linear() -> None:
    w = torch.randn(6, 16)
    mask = nm_mask(w, n=2, m=4)
    groups_w = w.abs().view(6, 4, 4)
    groups_m = mask.view(6, 4, 4)
    assert (groups_m.sum(-1) == 2).all()
    kept_min = torch.where(groups_m, groups_w, torch.inf).amin(-1)
    pruned_max = torch.where(groups_m, -torch.inf, groups_w).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_nm_mask_on_conv_groups_input_channels() -> None:
    w = torch.randn(3, 8, 3, 3)
    mask = nm_mask(w, n=1, m=4, dim=1)
    per_group = mask.view(3, 2, 4, 3, 3).sum(2)  # groups of 4 input channels per position
    assert (per_group == 1).all()
    expected = w.abs().view(3, 2, 4, 3, 3).argmax(2)
    assert torch.equal(mask.view(3, 2, 4, 3, 3).float().argmax(2), expected)


def test_nm_mask_divisibility_error_names_dimension_and_size() -> None:
    with pytest.raises(ValueError, match=r"dimension 1 .* size 6, which is not divisible by m=4"):
        nm_mask(torch.randn(4, 6), n=2, m=4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_mask(torch.randn(4, 8), n=4, m=4)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_sparsity_out_of_range_raises_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"sparsity must be"):
        magnitude_mask(torch.randn(4), bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sparsity must be"):
        check_sparsity(bad)  # type: ignore[arg-type]


def test_nan_weights_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        magnitude_mask(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="weight 'x' holds NaN"):
        global_magnitude_masks({"x": torch.tensor([float("nan")])}, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_lowest_k_picks_what_a_stable_sort_picks(seed: int) -> None:
    # the threshold form replaced a full stable sort (19.7 s and 2.6 GB for VGG-16's weights);
    # ties at the threshold still go to the lower index
    from slimtorch.prune.masks import lowest_k

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 7, (500,), generator=g).float()  # many ties
    scores[torch.randint(0, 500, (20,), generator=g)] = float("inf")
    for k in (0, 1, 37, 250, 499, 500):
        want = torch.zeros(500, dtype=torch.bool)
        want[torch.sort(scores, stable=True).indices[:k]] = True
        assert torch.equal(lowest_k(scores, k), want), k
