"""Image preprocessing: Kimi-VL's scaling, padding, normalisation and patch order."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fused_moonvit.moonvit import preprocess_image, preprocess_images
from fused_moonvit.moonvit.preprocess import tokens_per_image


def noise_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def unpatchify(pix, gh, gw):
    """(gh*gw, 3, 14, 14) -> (gh*14, gw*14, 3), the inverse of row-major patch cutting."""
    return pix.view(gh, gw, 3, 14, 14).permute(0, 3, 1, 4, 2).reshape(gh * 14, gw * 14, 3)


@pytest.mark.parametrize("w, h", [(28, 28), (100, 60), (57, 333), (448, 448), (1, 1)])
def test_pad_normalise_and_patch_order(w, h):
    img = noise_image(w, h, seed=w * h)
    pix, (gh, gw) = preprocess_image(img)
    assert (gh, gw) == (math.ceil(h / 28) * 2, math.ceil(w / 28) * 2)
    assert pix.shape == (gh * gw, 3, 14, 14) and pix.dtype == torch.float32
    full = unpatchify(pix, gh, gw)
    want = torch.from_numpy(np.asarray(img, dtype=np.float32)) / 255 * 2 - 1
    torch.testing.assert_close(full[:h, :w], want, rtol=0, atol=1e-6)
    # padding is black before normalisation: -1 after it
    assert (full[h:] == -1).all() and (full[:, w:] == -1).all()


def test_over_limit_is_scaled_by_sqrt():
    img = noise_image(1200, 900, seed=1)
    n = (1200 // 14) * (900 // 14)
    assert n > 4096
    scale = math.sqrt(4096 / n)
    new_w, new_h = int(1200 * scale), int(900 * scale)
    pix, (gh, gw) = preprocess_image(img, in_token_limit=4096)
    assert (gh, gw) == (math.ceil(new_h / 28) * 2, math.ceil(new_w / 28) * 2)
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    want = torch.from_numpy(np.asarray(resized, dtype=np.float32)) / 255 * 2 - 1
    torch.testing.assert_close(unpatchify(pix, gh, gw)[:new_h, :new_w], want, rtol=0, atol=1e-6)
    # with the Thinking model's limit the same image is not scaled
    _, grid = preprocess_image(img, in_token_limit=16384)
    assert grid == (66, 86)


def test_modes_are_converted_to_rgb():
    for mode in ("L", "RGBA"):
        img = noise_image(30, 40, mode, seed=2)
        pix, grid = preprocess_image(img)
        ref, ref_grid = preprocess_image(img.convert("RGB"))
        assert grid == ref_grid and torch.equal(pix, ref)
    gray, (gh, gw) = preprocess_image(noise_image(30, 40, "L", seed=3))
    full = unpatchify(gray, gh, gw)
    assert torch.equal(full[..., 0], full[..., 1]) and torch.equal(full[..., 1], full[..., 2])


def test_extreme_aspect_ratio():
    # 14 px high and 7000 px wide: 0 full patch rows, so no scaling; 500 patches wide fits
    pix, grid = preprocess_image(noise_image(7000, 14, seed=4))
    assert grid == (2, 500) and pix.shape[0] == 1000
    with pytest.raises(ValueError, match=r"at most 512 patches"):
        preprocess_image(noise_image(7300, 14, seed=5))
    with pytest.raises(ValueError, match=r"at most 512 patches"):
        preprocess_image(noise_image(14, 7300, seed=5))


def test_batch_and_paths(tmp_path):
    imgs = [noise_image(60, 30, seed=6), noise_image(29, 90, "RGBA", seed=7)]
    path = tmp_path / "b.png"
    imgs[1].save(path)
    pix, grids = preprocess_images([imgs[0], str(path)])
    assert grids.tolist() == [[4, 6], [8, 4]] and grids.dtype == torch.int64
    assert pix.shape == (56, 3, 14, 14)
    assert torch.equal(pix[24:], preprocess_image(imgs[1])[0])
    assert tokens_per_image(grids) == [6, 8]


def test_bad_arguments():
    with pytest.raises(ValueError, match="no image"):
        preprocess_images([])
    with pytest.raises(TypeError, match="PIL image or a path"):
        preprocess_image(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="in_token_limit"):
        preprocess_image(noise_image(5, 5), in_token_limit=0)
