from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtorch.data import AugmentConfig, apply_augment, random_crop, random_hflip


def _images(b: int = 16, c: int = 2, h: int = 5, w: int = 6) -> torch.Tensor:
    return (torch.arange(b * c * h * w) % 250 + 1).to(torch.uint8).view(b, c, h, w)


def test_crop_keeps_shape_and_takes_a_padded_window() -> None:
    x, p = _images(), 2
    out = random_crop(x, p, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (p, p, p, p))
    shifts = []
    for i in range(x.shape[0]):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 6])
        ]
        assert len(hits) == 1, f"sample {i} is not one window of the padded image"
        shifts.append(hits[0])
    assert len(set(shifts)) > 3  # offsets differ per sample
    assert any(s != (p, p) for s in shifts)  # content moved
    assert (out == 0).any()  # zero padding came in


def test_crop_deterministic_and_identity_cases() -> None:
    x = _images()
    a = random_crop(x, 3, generator=torch.Generator().manual_seed(7))
    b = random_crop(x, 3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert random_crop(x, 0) is x
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        random_crop(x[0], 1)


def test_hflip_per_sample() -> None:
    x = _images(b=64)
    torch.testing.assert_close(random_hflip(x, p=1.0), x.flip(3))
    torch.testing.assert_close(random_hflip(x, p=0.0), x)
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_config_validation_and_roundtrip() -> None:
    cfg = AugmentConfig(random_crop_padding=4, hflip=True)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.enabled and not AugmentConfig().enabled
    with pytest.raises(ValueError, match=r"random_crop_padding must be in \[0, 64\], got -1"):
        AugmentConfig(random_crop_padding=-1)
    with pytest.raises(ValueError, match="must be an int"):
        AugmentConfig(random_crop_padding=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hflip must be True or False"):
        AugmentConfig(hflip=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown AugmentConfig key"):
        AugmentConfig.from_dict({"rotate": 3})


def test_apply_augment_order() -> None:
    x = _images()
    cfg = AugmentConfig(random_crop_padding=1, hflip=True)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = random_hflip(random_crop(x, 1, generator=g2), generator=g2)
    torch.testing.assert_close(apply_augment(x, cfg, generator=g1), expected)
