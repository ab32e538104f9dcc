"""Reading an image as vLLM reads it (`load_image`): EXIF orientation, animated files, and every Pillow
mode, each against an expectation computed here from the EXIF specification or the pixel values, and
against vLLM's own loader."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fused_moonvit.moonvit import ImageNote, load_image, preprocess_image, read_frame_folder

ORIENTATION = 0x0112
# What a viewer shows for each EXIF orientation, from the stored pixels (rows, columns, channels), as
# the EXIF specification defines the value: where the stored 0th row and 0th column go.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                 # 0th row top, 0th column right
    3: lambda a: a[::-1, ::-1],              # 0th row bottom, 0th column right
    4: lambda a: a[::-1],                    # 0th row bottom, 0th column left
    5: lambda a: a.transpose(1, 0, 2),       # 0th row left, 0th column top
    6: lambda a: np.rot90(a, -1),            # 0th row right, 0th column top: a phone's portrait photo
    7: lambda a: np.rot90(a, -1)[::-1],      # 0th row right, 0th column bottom
    8: lambda a: np.rot90(a, 1),             # 0th row left, 0th column bottom
}


def _noise(h, w, seed, channels=3):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _save_with_orientation(pixels, path, orientation, **kwargs):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif, **kwargs)


def _quiet_load(image):
    """load_image, failing on any note: the cases that must change nothing unseen."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageNote)
        return load_image(image)


# --- EXIF orientation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_every_exif_orientation_is_applied_before_the_grid(tmp_path, orientation):
    stored = _noise(30, 60, seed=orientation)   # 60x30 px stored: 2x4 patch rows and columns
    _save_with_orientation(stored, tmp_path / "photo.png", orientation)
    upright = np.ascontiguousarray(UPRIGHT[orientation](stored))

    got = _quiet_load(tmp_path / "photo.png")
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), upright)
    pix, grid = preprocess_image(tmp_path / "photo.png")
    want, want_grid = preprocess_image(Image.fromarray(upright))
    assert grid == want_grid == ((6, 4) if orientation >= 5 else (4, 6))  # the 2x2 merge pads 30 px to 56
    assert torch.equal(pix, want)
    # A PIL image opened by the caller is turned the same way, as vLLM turns one passed to it.
    with Image.open(tmp_path / "photo.png") as opened:
        assert np.array_equal(np.asarray(_quiet_load(opened)), upright)


def test_jpeg_portrait_photo_is_turned_upright(tmp_path):
    """Orientation 6, as a phone stores a portrait photo: the grid is the upright one, and the pixels are the
    stored ones turned (decoding is the same; turning moves pixels without changing them)."""
    _save_with_orientation(_noise(224, 448, seed=1), tmp_path / "portrait.jpg", 6, quality=90)
    with Image.open(tmp_path / "portrait.jpg") as opened:
        decoded = np.asarray(opened.convert("RGB"))
    assert decoded.shape == (224, 448, 3)
    got = np.asarray(_quiet_load(tmp_path / "portrait.jpg"))
    assert np.array_equal(got, np.rot90(decoded, -1))
    assert preprocess_image(tmp_path / "portrait.jpg")[1] == (32, 16)


def test_k25_image_and_frame_folder_are_turned_upright(tmp_path):
    pytest.importorskip("torchvision", reason="transformers' Kimi-K2.5 processors need torchvision")
    from fused_moonvit.moonvit import KimiK25Inputs

    k25 = KimiK25Inputs()
    stored = _noise(30, 60, seed=8)
    _save_with_orientation(stored, tmp_path / "photo.png", 8)
    upright = np.ascontiguousarray(np.rot90(stored, 1))
    pix, grid = k25.image_inputs(tmp_path / "photo.png")
    want, want_grid = k25.image_inputs(Image.fromarray(upright))
    assert grid == want_grid == (1, 6, 4) and torch.equal(pix, want)

    (tmp_path / "frames").mkdir()
    frames = [_noise(20, 40, seed=10 + i) for i in range(3)]
    for i, frame in enumerate(frames):
        # the middle frame is stored turned, as a phone may store one frame of a burst
        if i == 1:
            _save_with_orientation(np.ascontiguousarray(np.rot90(frame, 1)), tmp_path / "frames" / f"{i}.png", 6)
        else:
            Image.fromarray(frame).save(tmp_path / "frames" / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageNote)
        got, names = read_frame_folder(tmp_path / "frames")
    assert names == ["0.png", "1.png", "2.png"] and np.array_equal(got, np.stack(frames))


# EXIF data whose TIFF header is not one: Pillow cannot read its orientation.
BROKEN_EXIF = b"Exif\x00\x00XX\x00*\x00\x00\x00\x08"


def test_exif_that_cannot_be_applied_leaves_the_image_as_stored_and_says_so(tmp_path):
    stored = _noise(14, 28, seed=41)
    Image.fromarray(stored).save(tmp_path / "broken.png", exif=BROKEN_EXIF)
    notes = []
    got = load_image(tmp_path / "broken.png", notes=notes)
    assert np.array_equal(np.asarray(got), stored)
    assert len(notes) == 1 and notes[0].startswith("its EXIF orientation cannot be applied (not a TIFF file")
    assert notes[0].endswith("); it is encoded as stored, as vLLM encodes it")
    # The image handed on carries no EXIF to fail on again (the command line reads each image twice).
    assert np.array_equal(np.asarray(_quiet_load(got)), stored)


# --- Animated and multi-frame files ------------------------------------------------------------------------

def _animated_gif(path, frames=3):
    palette = _noise(256, 1, seed=3).reshape(-1).tolist()
    images = []
    for i in range(frames):
        image = Image.fromarray(_noise(16, 24, seed=20 + i, channels=1), "P")
        image.putpalette(palette)
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return np.asarray(images[0].convert("RGB"))


def test_animated_gif_keeps_its_first_frame_and_says_so(tmp_path):
    first = _animated_gif(tmp_path / "anim.gif")
    with pytest.warns(ImageNote) as caught:
        got = load_image(tmp_path / "anim.gif")
    assert np.array_equal(np.asarray(got), first)
    (message,) = [str(w.message) for w in caught]
    assert message == (f"{tmp_path / 'anim.gif'}: holds 3 frames (an animated or multi-page image); only the first "
                       f"is encoded, as vLLM encodes it")
    # The warning names the caller's line, not this package's.
    assert Path(caught[0].filename).resolve() == Path(__file__).resolve()

    with Image.open(tmp_path / "anim.gif") as opened:
        opened.seek(2)
        third = np.asarray(opened.convert("RGB"))
        notes = []
        got = load_image(opened, notes=notes)
    assert np.array_equal(np.asarray(got), third)
    assert notes == ["holds 3 frames (an animated or multi-page image); only frame 2 (counting from 0), the one "
                     "it is at, is encoded, as vLLM encodes it"]


def test_mpo_photo_keeps_its_picture_without_a_note(tmp_path):
    """A JPEG whose Multi-Picture data holds a second image (a preview, or the gain map of an Ultra HDR photo):
    the picture is the first frame, and keeping it drops nothing seen."""
    picture = _noise(16, 24, seed=40)
    Image.fromarray(picture).save(tmp_path / "photo.jpg", "MPO", save_all=True,
                                  append_images=[Image.new("RGB", (12, 8), (9, 9, 9))], quality=95)
    with Image.open(tmp_path / "photo.jpg") as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
        decoded = np.asarray(opened.convert("RGB"))
    assert np.array_equal(np.asarray(_quiet_load(tmp_path / "photo.jpg")), decoded)


def test_preprocess_warns_from_the_callers_line(tmp_path):
    _animated_gif(tmp_path / "anim.gif")
    with pytest.warns(ImageNote, match="holds 3 frames") as caught:
        preprocess_image(tmp_path / "anim.gif")
    assert len(caught) == 1 and Path(caught[0].filename).resolve() == Path(__file__).resolve()


# --- Modes -------------------------------------------------------------------------------------------------

def _on_white(rgb, alpha):
    return rgb.astype(np.float64) * alpha[..., None] / 255 + 255 * (1 - alpha[..., None] / 255)


def _assert_composited(got, rgb, alpha):
    """Within rounding of the alpha blend onto white, and exact where alpha is 0 or 255."""
    want = _on_white(rgb, alpha)
    assert np.abs(got.astype(np.float64) - want).max() <= 1
    assert (got[alpha == 0] == 255).all()
    assert np.array_equal(got[alpha == 255], rgb[alpha == 255])


def _gray_rgb(values):
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def _wide(tmp_path, mode, values, fmt):
    """An image of a mode wider than 8 bits from `values`, saved losslessly and read back in that mode."""
    path = tmp_path / f"deep.{fmt}"
    h, w = values.shape
    raw = values.astype({"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]).tobytes()
    Image.frombytes(mode, (w, h), raw).save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode and np.array_equal(np.asarray(reread), values.astype(np.asarray(reread).dtype))
    return path


@pytest.mark.parametrize("mode, fmt", [("I;16", "tif"), ("I;16", "png"), ("I;16B", "tif")])
def test_16_bit_is_clipped_as_vllm_clips_it_and_says_so(tmp_path, mode, fmt):
    values = np.random.default_rng(4).integers(0, 65536, (12, 20))
    values[0, :5] = [0, 1, 254, 255, 256]
    path = _wide(tmp_path, mode, values, fmt)
    notes = []
    got = np.asarray(load_image(path, notes=notes))
    assert np.array_equal(got, _gray_rgb(np.clip(values, 0, 255)))
    clipped = (values > 255).mean()
    assert clipped > 0.98  # what a real 16-bit scan looks like: nearly all white
    assert notes == [f"16-bit integer grayscale ({mode}): converted to 8 bits as vLLM converts it, clipping values "
                     f"to 0..255, which changes {clipped:.0%} of its pixels (values above 255 become white); to "
                     f"keep its contrast, scale it to 0..255 before encoding or serving it"]


def test_16_bit_within_8_bits_changes_nothing_and_says_nothing(tmp_path):
    values = np.random.default_rng(5).integers(0, 256, (12, 20))
    got = np.asarray(_quiet_load(_wide(tmp_path, "I;16", values, "png")))
    assert np.array_equal(got, _gray_rgb(values))


def test_32_bit_integer_and_float(tmp_path):
    ints = np.random.default_rng(6).integers(-300, 600, (10, 10))
    notes = []
    got = np.asarray(load_image(_wide(tmp_path, "I", ints, "tif"), notes=notes))
    assert np.array_equal(got, _gray_rgb(np.clip(ints, 0, 255)))
    changed = ((ints < 0) | (ints > 255)).mean()
    assert notes and notes[0].startswith(f"32-bit integer grayscale (I): converted to 8 bits as vLLM converts it, "
                                         f"clipping values to 0..255, which changes {changed:.0%} of its pixels")

    floats = np.random.default_rng(7).uniform(-20, 300, (10, 10)).astype(np.float32)
    floats[0, :4] = [3.0, 254.99, 255.0, 0.0]
    (tmp_path / "deep.tif").unlink()
    notes = []
    got = np.asarray(load_image(_wide(tmp_path, "F", floats, "tif"), notes=notes))
    assert np.array_equal(got, _gray_rgb(np.clip(np.floor(floats), 0, 255)))
    changed = ((floats < 0) | (floats > 255) | (floats != np.floor(floats))).mean()
    assert notes and notes[0].startswith(f"32-bit float grayscale (F): converted to 8 bits as vLLM converts it, "
                                         f"clipping values to 0..255 and dropping fractions, which changes "
                                         f"{changed:.0%} of its pixels")


def test_transparency_is_composited_onto_white(tmp_path):
    rgb, alpha = _noise(12, 20, seed=8), _noise(12, 20, seed=9, channels=1)
    alpha[0, :3] = [0, 255, 128]
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    _assert_composited(np.asarray(_quiet_load(tmp_path / "rgba.png")), rgb, alpha)

    gray = _noise(12, 20, seed=10, channels=1)
    Image.fromarray(np.dstack([gray, alpha]), "LA").save(tmp_path / "la.png")
    _assert_composited(np.asarray(_quiet_load(tmp_path / "la.png")), _gray_rgb(gray), alpha)

    # A palette image with a transparent index, as GIFs and small PNGs hold one.
    palette = _noise(256, 3, seed=11, channels=1).reshape(-1)
    index = _noise(12, 20, seed=12, channels=1)
    index[0, :2] = [7, 8]
    paletted = Image.fromarray(index, "P")
    paletted.putpalette(palette.tolist())
    paletted.save(tmp_path / "p.png", transparency=7)
    colours = palette.reshape(256, 3)[index]
    _assert_composited(np.asarray(_quiet_load(tmp_path / "p.png")), colours, np.where(index == 7, 0, 255))

    # PA (a palette and an alpha band), in memory: no common file format stores it.
    pa = Image.merge("PA", [paletted, Image.fromarray(alpha)])
    pa.putpalette(palette.tolist())
    _assert_composited(np.asarray(_quiet_load(pa)), colours, alpha)

    # An RGB image whose tRNS chunk names one transparent colour.
    rgb[3, 4] = rgb[5, 6] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "trns.png", transparency=(1, 2, 3))
    keyed = (rgb == (1, 2, 3)).all(axis=-1)
    _assert_composited(np.asarray(_quiet_load(tmp_path / "trns.png")), rgb, np.where(keyed, 0, 255))


def test_opaque_modes(tmp_path):
    bits = _noise(12, 20, seed=13, channels=1) > 127
    Image.fromarray(bits).save(tmp_path / "bilevel.png")
    with Image.open(tmp_path / "bilevel.png") as reread:
        assert reread.mode == "1"
    assert np.array_equal(np.asarray(_quiet_load(tmp_path / "bilevel.png")), _gray_rgb(np.where(bits, 255, 0)))

    gray = _noise(12, 20, seed=14, channels=1)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(np.asarray(_quiet_load(tmp_path / "gray.png")), _gray_rgb(gray))

    palette = _noise(256, 3, seed=15, channels=1).reshape(-1)
    index = _noise(12, 20, seed=16, channels=1)
    paletted = Image.fromarray(index, "P")
    paletted.putpalette(palette.tolist())
    paletted.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(_quiet_load(tmp_path / "p.png")), palette.reshape(256, 3)[index])

    # CMYK, as print files hold it: Pillow's formula (no colour profile), R = (255 - C) * (255 - K) / 255.
    cmyk = _noise(12, 20, seed=17, channels=4)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.tif")
    c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
    want = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], axis=-1) / 255
    assert np.abs(np.asarray(_quiet_load(tmp_path / "print.tif")) - want).max() <= 0.5


def test_a_mode_pillow_cannot_make_rgb_is_named():
    premultiplied = Image.new("La", (4, 4))
    with pytest.raises(ValueError, match=r"its pixels, of mode La, cannot be converted to RGB \(conversion from La"):
        load_image(premultiplied)
    with pytest.raises(TypeError, match="expected a PIL image or a path, got ndarray"):
        load_image(np.zeros((4, 4, 3), np.uint8))


def test_frame_folder_notes_are_gathered_by_kind(tmp_path):
    (tmp_path / "frames").mkdir()
    for i in range(3):
        values = np.full((10, 14), 1000 * (i + 1))
        Image.frombytes("I;16", (14, 10), values.astype("<u2").tobytes()).save(tmp_path / "frames" / f"{i}.png")
    notes = []
    frames, _ = read_frame_folder(tmp_path / "frames", notes=notes)
    assert (frames == 255).all()
    assert notes == ["frame 0.png (and 2 more like it): 16-bit integer grayscale (I;16): converted to 8 bits as "
                     "vLLM converts it, clipping values to 0..255, which changes 100% of its pixels (values above "
                     "255 become white); to keep its contrast, scale it to 0..255 before encoding or serving it"]
    with pytest.warns(ImageNote) as caught:
        read_frame_folder(tmp_path / "frames")
    assert [str(w.message) for w in caught] == [f"{tmp_path / 'frames'}: {notes[0]}"]


# --- vLLM's own loader, the served model's input ------------------------------------------------------------

def _files_of_every_kind(tmp_path) -> list[Path]:
    for orientation in sorted(UPRIGHT):
        _save_with_orientation(_noise(14, 28, seed=orientation), tmp_path / f"exif{orientation}.png", orientation)
    _save_with_orientation(_noise(28, 56, seed=30), tmp_path / "portrait.jpg", 6)
    _animated_gif(tmp_path / "anim.gif")
    _wide(tmp_path, "I;16", np.random.default_rng(31).integers(0, 65536, (12, 20)), "tif")
    _wide(tmp_path, "I;16B", np.random.default_rng(32).integers(0, 65536, (12, 20)), "tiff")
    rgb, alpha = _noise(12, 20, seed=33), _noise(12, 20, seed=34, channels=1)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(tmp_path / "la.png")
    paletted = Image.fromarray(_noise(12, 20, seed=35, channels=1), "P")
    paletted.putpalette(_noise(256, 3, seed=36, channels=1).reshape(-1).tolist())
    paletted.save(tmp_path / "p.png", transparency=5)
    Image.fromarray(_noise(12, 20, seed=37, channels=4), "CMYK").save(tmp_path / "print.tif")
    Image.fromarray(_noise(12, 20, seed=38, channels=1) > 127).save(tmp_path / "bilevel.png")
    Image.fromarray(_noise(16, 24, seed=39)).save(tmp_path / "mpo.jpg", "MPO", save_all=True,
                                                  append_images=[Image.new("RGB", (12, 8))])
    Image.fromarray(_noise(12, 20, seed=40)).save(tmp_path / "broken_exif.png", exif=BROKEN_EXIF)
    return sorted(p for p in tmp_path.iterdir())


@pytest.mark.vllm
def test_every_kind_matches_vllms_loader_bit_for_bit(tmp_path):
    from vllm.multimodal.media.image import ImageMediaIO

    served = ImageMediaIO()
    paths = _files_of_every_kind(tmp_path)
    assert len(paths) == 19
    for path in paths:
        want = served.load_bytes(path.read_bytes()).media
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageNote)
            got = load_image(path)
            with Image.open(io.BytesIO(path.read_bytes())) as opened:  # and as a PIL image passed in
                from_pil = load_image(opened)
        assert want.mode == got.mode == from_pil.mode == "RGB", path.name
        assert np.array_equal(np.asarray(got), np.asarray(want)), path.name
        assert np.array_equal(np.asarray(from_pil), np.asarray(want)), path.name
