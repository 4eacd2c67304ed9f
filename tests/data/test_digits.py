from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from slimtorch.data import load_dataset, load_digits_dataset


def test_all_is_scaled_sklearn_digits() -> None:
    ds = load_digits_dataset("all")
    ref = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    expected = np.rint(ref.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), expected)
    assert ds.labels.tolist() == ref.target.tolist()
    assert int(ds.images.max()) == 255  # 16 -> 255


def test_fixed_stratified_split() -> None:
    train, test = load_digits_dataset("train"), load_digits_dataset("test")
    assert (len(train), len(test)) == (1438, 359)
    full_counts = torch.bincount(load_digits_dataset("all").labels, minlength=10)
    expected_test = [round(int(c) * 0.2) for c in full_counts]
    assert torch.bincount(test.labels, minlength=10).tolist() == expected_test
    again = load_dataset("digits", "test")
    torch.testing.assert_close(again.images, test.images)
    assert again.name == "digits/test" and train.name == "digits/train"
    # train + test is the whole set, as a multiset of (image, label) rows
    rows = torch.cat([train.images.view(-1, 64), train.labels[:, None]], 1).tolist()
    rows += torch.cat([test.images.view(-1, 64), test.labels[:, None]], 1).tolist()
    full = load_digits_dataset("all")
    assert sorted(rows) == sorted(
        torch.cat([full.images.view(-1, 64), full.labels[:, None]], 1).tolist()
    )


def test_mean_std_constants_match_data() -> None:
    ds = load_digits_dataset("all")
    x = ds.images.double() / 255
    assert abs(x.mean().item() - ds.mean[0]) < 1e-3
    assert abs(x.std(unbiased=False).item() - ds.std[0]) < 1e-3


def test_normalisation_statistics_come_from_the_training_split() -> None:
    from slimtorch.data.digits import DIGITS_MEAN, DIGITS_STD

    x = load_digits_dataset("train").images.double() / 255
    assert DIGITS_MEAN[0] == pytest.approx(x.mean().item(), abs=5e-5)
    assert DIGITS_STD[0] == pytest.approx(x.std(unbiased=False).item(), abs=5e-5)
