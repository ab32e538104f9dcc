"""Image preprocessing: Kimi-VL's scaling, padding, normalisation and patch order by hand; Kimi-K2.5's images
and video chunks through transformers' processors, checked against the pixels; frame folders and video files."""

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
    img = noise_image(30, 40, "L", seed=2)
    pix, grid = preprocess_image(img)
    ref, ref_grid = preprocess_image(img.convert("RGB"))
    assert grid == ref_grid and torch.equal(pix, ref)
    # Transparent pixels show white, as vLLM composites them (tests/test_images.py covers every mode).
    rgba = np.asarray(noise_image(30, 40, "RGBA", seed=2), dtype=np.float64)
    alpha = rgba[..., 3:] / 255
    pix, (gh, gw) = preprocess_image(Image.fromarray(rgba.astype(np.uint8), "RGBA"))
    want = torch.from_numpy((rgba[..., :3] * alpha + 255 * (1 - alpha)) / 255 * 2 - 1).float()
    assert (unpatchify(pix, gh, gw)[:40, :30] - want).abs().max() <= 2 / 255 + 1e-6
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


# --- Kimi-K2.5: transformers' own image and video processors, checked against the images themselves ---

import json  # noqa: E402
import sys  # noqa: E402

from moonvit_fixtures import KIMI_K25_PREPROCESSOR_JSON, write_video  # noqa: E402
from fused_moonvit.moonvit.preprocess import (KimiK25Inputs, frame_files, pyav_available,  # noqa: E402
                                              read_frame_folder, read_video_file)



def k25_inputs(model_dir=None):
    pytest.importorskip("torchvision", reason="transformers' Kimi-K2.5 processors need torchvision")
    return KimiK25Inputs(model_dir)


ONE_LEVEL = 2 / 255  # one 8-bit step after normalising with mean 0.5 and std 0.5


def normalised(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32)) / 255 * 2 - 1


def unpatchify_frames(pix, t, gh, gw):
    """(t*gh*gw, 3, 14, 14), frame-major then row-major -> (t, gh*14, gw*14, 3)."""
    return pix.view(t, gh, gw, 3, 14, 14).permute(0, 1, 4, 2, 5, 3).reshape(t, gh * 14, gw * 14, 3)


def navit_size(w, h, limit, side=512, patch=14):
    """The processors' documented resize: the most restrictive of the patch limit (sqrt), and the side
    limit, never upscaling; sides truncated to whole pixels."""
    scale = min(1.0, math.sqrt(limit / (max(1, w // patch) * max(1, h // patch))), side * patch / w, side * patch / h)
    return max(1, int(w * scale)), max(1, int(h * scale))


@pytest.fixture(scope="module")
def k25():
    return k25_inputs()


@pytest.mark.parametrize("w, h", [(60, 30), (57, 333), (28, 28), (1, 1)])
def test_k25_image_patches_are_the_image(k25, w, h):
    img = noise_image(w, h, seed=w + h)
    pix, grid = k25.image_inputs(img)
    assert grid == (1, math.ceil(h / 28) * 2, math.ceil(w / 28) * 2)
    assert pix.dtype == torch.float32 and pix.shape == (grid[1] * grid[2], 3, 14, 14)
    (full,) = unpatchify_frames(pix, *grid)
    torch.testing.assert_close(full[:h, :w], normalised(img), rtol=0, atol=1e-6)
    assert (full[h:] == -1).all() and (full[:, w:] == -1).all()


def test_k25_image_downscaled_like_pillow_bicubic(k25):
    img = noise_image(300, 200, seed=8)
    pix, grid = k25.image_inputs(img, max_patches=64)
    nw, nh = navit_size(300, 200, 64)
    assert grid == (1, math.ceil(nh / 28) * 2, math.ceil(nw / 28) * 2) == (1, 8, 10)
    (full,) = unpatchify_frames(pix, *grid)
    # torchvision's antialiased bicubic on uint8 against Pillow's: within one 8-bit step
    diff = (full[:nh, :nw] - normalised(img.resize((nw, nh), Image.Resampling.BICUBIC))).abs()
    assert diff.max() <= ONE_LEVEL + 1e-6 and diff.mean() < 1e-3
    assert (full[nh:] == -1).all() and (full[:, nw:] == -1).all()
    # the default limit (16384 patches) leaves it alone
    assert k25.image_inputs(img)[1] == (1, 16, 22)


def test_k25_modes_become_rgb(k25):
    gray = noise_image(30, 40, "L", seed=9)
    pix, grid = k25.image_inputs(gray)
    ref, ref_grid = k25.image_inputs(gray.convert("RGB"))
    assert grid == ref_grid and torch.equal(pix, ref)


@pytest.mark.parametrize("frames", [1, 4, 7, 9])
def test_k25_video_chunks_are_frame_major(k25, frames):
    rng = np.random.default_rng(frames)
    video = rng.integers(0, 256, (frames, 30, 50, 3), dtype=np.uint8)
    pix, grids = k25.video_inputs(video)
    sizes = [4] * (frames // 4) + ([frames % 4] if frames % 4 else [])
    assert grids.tolist() == [[t, 4, 4] for t in sizes] and grids.dtype == torch.int64  # 30x50 px pad to 56x56
    assert pix.shape == (frames * 16, 3, 14, 14) and pix.dtype == torch.float32
    start, first = 0, 0
    for t in sizes:
        full = unpatchify_frames(pix[start:start + t * 16], t, 4, 4)
        want = torch.from_numpy(video[first:first + t].astype(np.float32)) / 255 * 2 - 1
        torch.testing.assert_close(full[:, :30, :50], want, rtol=0, atol=1e-6)
        assert (full[:, 30:] == -1).all() and (full[:, :, 50:] == -1).all()
        start, first = start + t * 16, first + t


def test_k25_defaults_without_processor_files(tmp_path, k25):
    for inputs in (k25, k25_inputs(tmp_path)):
        assert inputs.source == "the processor classes' defaults"
        assert (inputs.image.max_patches, inputs.video.max_patches) == (16384, 4096)
        assert (inputs.video.fps, inputs.frames_per_chunk, inputs.image.size.max_height) == (2, 4, 512)


def test_k25_missing_directory_is_refused(tmp_path):
    """A directory that is not there is a mistake (a typo), not a request for the defaults."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match=f"model directory '{tmp_path}/nope' does not exist; give the local "
                                                f"directory of a Kimi-K2.5 / K2.6 or Kimi-K3 / K3.1 model, or None"):
        KimiK25Inputs(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match=f"model directory '{tmp_path}/a-file' is not a directory"):
        KimiK25Inputs(str(tmp_path / "a-file"))


def test_k25_settings_from_the_shipped_media_proc_cfg(tmp_path):
    cfg = json.loads(json.dumps(KIMI_K25_PREPROCESSOR_JSON))
    cfg["media_proc_cfg"].update(in_patch_limit=1000, patch_limit_on_one_side=20, in_patch_limit_each_frame=300,
                                 sample_fps=3.0, temporal_merge_kernel_size=2, image_mean=[0.25, 0.5, 0.75])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    inputs = k25_inputs(tmp_path)
    assert inputs.source == f"{tmp_path}/preprocessor_config.json (media_proc_cfg: images and videos)"
    assert (inputs.image.max_patches, inputs.video.max_patches) == (1000, 300)
    assert (inputs.video.fps, inputs.frames_per_chunk) == (3.0, 2)
    assert inputs.image.size.max_height == inputs.video.size.max_width == 20
    assert list(inputs.image.image_mean) == list(inputs.video.image_mean) == [0.25, 0.5, 0.75]
    # the side limit caps a wide image at 20 patches, 280 px
    img = noise_image(600, 56, seed=10)
    assert inputs.image_inputs(img)[1] == (1, 2, 20)
    pix, _ = inputs.image_inputs(noise_image(28, 28, seed=11))
    full = unpatchify_frames(pix, 1, 2, 2)[0]
    img = noise_image(28, 28, seed=11)
    want = (torch.from_numpy(np.asarray(img, dtype=np.float32)) / 255 - torch.tensor([0.25, 0.5, 0.75])) / 0.5
    torch.testing.assert_close(full, want, rtol=0, atol=1e-6)
    # chunks of 2 frames
    assert inputs.video_inputs(np.zeros((5, 28, 28, 3), np.uint8))[1][:, 0].tolist() == [2, 2, 1]


def test_k25_native_settings_win(tmp_path):
    cfg = dict(KIMI_K25_PREPROCESSOR_JSON, max_patches=2000, image_processor_type="Kimi_K25ImageProcessor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"max_patches": 500, "fps": 1.0, "size": {"max_height": 64, "max_width": 64}}))
    inputs = k25_inputs(tmp_path)
    assert (inputs.image.max_patches, inputs.video.max_patches, inputs.video.fps) == (2000, 500, 1.0)
    assert inputs.video.size.max_height == 64 and inputs.image.size.max_height == 512
    assert inputs.source.endswith("video_preprocessor_config.json")


def test_k25_settings_nested_in_processor_config(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"max_patches": 1234}, "video_processor": {"temporal_patch_size": 3}}))
    inputs = k25_inputs(tmp_path)
    assert (inputs.image.max_patches, inputs.frames_per_chunk) == (1234, 3)


def test_k25_settings_that_cannot_be_honoured(tmp_path):
    cfg = json.loads(json.dumps(KIMI_K25_PREPROCESSOR_JSON))
    cfg["media_proc_cfg"]["fixed_output_tokens"] = 256
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fixed_output_tokens=256 has no equivalent"):
        k25_inputs(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        k25_inputs(tmp_path)
    inputs = k25_inputs()
    with pytest.raises(ValueError, match="groups 4 frames per chunk .* time embedding has 1 frames"):
        inputs.check_model(14, 1)
    with pytest.raises(ValueError, match="cuts 14-pixel patches .* patch_size is 16"):
        inputs.check_model(16, 4)


def test_k25_frame_sampling(tmp_path):
    inputs = k25_inputs()
    # transformers' rule: int(frames / video fps * 2) frames, evenly spaced
    n = int(100 / 30 * 2)
    assert inputs.sample_indices(100, 30.0) == [i * 100 // n for i in range(n)] == [0, 16, 33, 50, 66, 83]
    assert inputs.sample_indices(5, 1.0) == [0, 1, 2, 3, 4]  # slower than 2 fps: every frame
    cfg = json.loads(json.dumps(KIMI_K25_PREPROCESSOR_JSON))
    cfg["media_proc_cfg"]["max_num_frames_each_video"] = 3
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert k25_inputs(tmp_path).sample_indices(100, 30.0) == [0, 33, 66]


def test_k25_video_patch_limit_shared_by_frames(tmp_path):
    cfg = json.loads(json.dumps(KIMI_K25_PREPROCESSOR_JSON))
    cfg["media_proc_cfg"]["in_patch_limit_video"] = 80
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    inputs, video = k25_inputs(tmp_path), np.zeros((4, 140, 140, 3), np.uint8)
    nw, nh = navit_size(140, 140, 80 // 4)
    assert inputs.video_inputs(video)[1].tolist() == [[4, math.ceil(nh / 28) * 2, math.ceil(nw / 28) * 2]] \
        == [[4, 6, 6]]
    assert k25_inputs().video_inputs(video)[1].tolist() == [[4, 10, 10]]


def test_frame_folder(tmp_path):
    names = ["f10.png", "f02.jpg", "f01.png", ".hidden"]
    for i, name in enumerate(names):
        (noise_image(30, 20, "L" if i == 1 else "RGB", seed=i).save(tmp_path / name) if name[0] != "."
         else (tmp_path / name).write_text("x"))
    frames, got = read_frame_folder(tmp_path)
    assert got == ["f01.png", "f02.jpg", "f10.png"] and frames.shape == (3, 20, 30, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[0], np.asarray(Image.open(tmp_path / "f01.png").convert("RGB")))
    assert np.array_equal(frames[1], np.asarray(Image.open(tmp_path / "f02.jpg").convert("RGB")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds notes.txt, which is not an image file"):
        frame_files(tmp_path)
    (tmp_path / "notes.txt").unlink()
    noise_image(32, 20, seed=9).save(tmp_path / "f11.png")
    with pytest.raises(ValueError, match=r"f11.png is 32x20 px, but .*f01.png is 30x20"):
        read_frame_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no frame images"):
        frame_files(tmp_path / "empty")


def test_read_video_file_samples_like_the_processor(tmp_path):
    pytest.importorskip("av")
    write_video(tmp_path / "clip.mp4", frames=10, fps=5)
    inputs, seen = k25_inputs(), []
    frames, indices, fps = read_video_file(tmp_path / "clip.mp4", inputs.sample_indices, progress=seen.append)
    assert fps == 5.0 and indices == [0, 2, 5, 7] == inputs.sample_indices(10, 5.0)  # 2 s at 2 fps
    assert frames.shape == (4, 48, 64, 3) and seen == [1, 2, 3, 4]
    levels = frames.reshape(4, -1).mean(axis=1)
    assert np.abs(levels - 20 * np.array(indices)).max() < 4, levels


def test_video_file_needs_pyav(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)
    assert not pyav_available()
    with pytest.raises(ImportError, match="needs PyAV, which is not installed: pip install av"):
        read_video_file(tmp_path / "clip.mp4", k25_inputs().sample_indices)


def test_not_a_video(tmp_path):
    pytest.importorskip("av")
    (tmp_path / "clip.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="clip.mp4 is not a video PyAV can open"):
        read_video_file(tmp_path / "clip.mp4", k25_inputs().sample_indices)
