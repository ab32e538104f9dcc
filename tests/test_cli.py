"""The main job: `fused-moonvit encode`."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from forked_cases import HANG_GUARD_S
from moonvit_fixtures import kimi_vl_config_json, random_model, tiny_config, write_checkpoint
from fused_moonvit.moonvit import build_model, preprocess_image, MoonVitConfig, MoonVitReference
from fused_moonvit.benchmarks.bench_encoder import ROWS
from fused_moonvit.moonvit.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    cfg = tiny_config()
    write_checkpoint(path, dict(random_model(cfg, seed=22).state_dict()), kimi_vl_config_json(cfg))
    return path


def test_encode_with_model_dir(tmp_path, capsys):
    cfg = tiny_config()
    write_checkpoint(tmp_path / "model", dict(random_model(cfg, seed=21).state_dict()), kimi_vl_config_json(cfg))
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(60, 30), (90, 200)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "emb.safetensors"
    assert main(["encode", *paths, "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "grid 4x6 patches -> 6 tokens" in printed and "grid 16x8 patches -> 32 tokens" in printed
    model = build_model(MoonVitReference, tmp_path / "model")
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == ["image_0", "image_1"]
        assert f.metadata()["image_1"] == paths[1]
        for i, p in enumerate(paths):
            pix, grid = preprocess_image(p)
            torch.testing.assert_close(f.get_tensor(f"image_{i}"), model(pix, torch.tensor([grid])))


def test_encode_bad_path(tmp_path, capsys):
    assert main(["encode", str(tmp_path / "nope.png")]) == 2
    assert "no such image file" in capsys.readouterr().err


def test_console_script_demo_random_weights(tmp_path):
    """The README's first command, at the real size with seeded random weights."""
    out = tmp_path / "demo.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fused_moonvit.moonvit.cli", "encode", "--demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert "seeded random weights" in proc.stderr
    assert "no CUDA device (cpu)" in proc.stderr and "eager reference" in proc.stderr
    assert "demo: grid 16x24 patches -> 96 tokens x 2048" in proc.stdout
    with safe_open(out, framework="pt") as f:
        emb = f.get_tensor("image_0")
    assert emb.shape == (96, 2048) and torch.isfinite(emb).all()


def test_bench_subcommand_smoke(tmp_path):
    assert main(["bench", "encoder", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "encoder.json").read_text())
    # Every row but vLLM's FA3 and the fused graph on the Gluon attention, which need Hopper.
    assert data["sets"] and all(set(r["rows"]) == set(ROWS) - {"vllm_fa3", "fused_gluon"} for r in data["sets"])
    assert (tmp_path / "encoder.png").stat().st_size > 0


def test_encode_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((14, 7300, 3), dtype=np.uint8)).save(wide)
    assert main(["encode", str(wide), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"error: {wide}: " in err and "at most 512 patches" in err and "model" not in err
    with pytest.raises(SystemExit):
        main(["encode", "--demo", "--in-token-limit", "0"])
    assert "must be >= 4, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_output_file_follows_the_umask(tmp_path, tiny_model_dir):
    out = tmp_path / "emb.safetensors"
    previous = os.umask(0o027)
    try:
        assert main(["encode", "--demo", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["emb.safetensors"]


def test_failed_write_leaves_no_partial_file(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "emb.safetensors"

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        main(["encode", "--demo", "--model", str(tiny_model_dir), "--out", str(out)])
    assert os.listdir(tmp_path) == []


def test_bench_kernels_writes_into_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "kernels", "--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: fused-moonvit bench kernels ")
    assert "default: benchmarks/results" in " ".join(usage.split())
    assert main(["bench", "kernels", "--smoke", "--sets", "one", "--out", str(tmp_path / "k")]) == 0
    assert sorted(os.listdir(tmp_path / "k")) == ["kernels.json", "kernels.png"]
    report = json.loads((tmp_path / "k" / "kernels.json").read_text())
    assert report["results"]
    # The RoPE row's baseline is vLLM 0.34's in-place kernel, as the metadata says.
    assert "packed QKV buffer" in report["meta"]["baseline_rope"]
    assert {r["baseline"] for r in report["results"] if r["kernel"] == "rope"} == {"vLLM 0.34's packed q/k RoPE kernel"}


def test_huge_image_is_encoded_without_pillows_warning(tmp_path, tiny_model_dir):
    """192 megapixels, below the command's limit of 250 but above both of Pillow's decompression-bomb
    thresholds (a warning above 89, a traceback above 179): encoded, with nothing from Pillow on stderr."""
    Image.new("1", (16000, 12000)).save(tmp_path / "huge.png")
    out = tmp_path / "emb.safetensors"
    script = Path(sys.executable).with_name("fused-moonvit")
    proc = subprocess.run([str(script), "encode", str(tmp_path / "huge.png"), "--model", str(tiny_model_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert "DecompressionBomb" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    # 4096 patches' worth, as the processor scales it: sqrt(4096 / (1142 * 857)) of each side
    assert f"{tmp_path / 'huge.png'}: grid 56x74 patches -> 1036 tokens x 24" in proc.stdout
    with safe_open(out, framework="pt") as f:
        assert f.get_tensor("image_0").shape == (1036, 24)


def test_ctrl_c_mid_encode_exits_130_with_one_line_and_no_file(tmp_path):
    """SIGINT while the real-size model encodes a 896x896 image (tens of seconds on a CPU)."""
    import signal
    import time

    Image.new("RGB", (896, 896), (40, 90, 200)).save(tmp_path / "photo.png")
    out = tmp_path / "out" / "emb.safetensors"
    out.parent.mkdir()
    script = Path(sys.executable).with_name("fused-moonvit")
    # As from a terminal: a shell running this test in the background may have left SIGINT ignored.
    proc = subprocess.Popen([str(script), "encode", str(tmp_path / "photo.png"), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    before = []
    for line in proc.stderr:
        before.append(line)
        if " ready on " in line:
            break
    time.sleep(1.0)
    assert proc.poll() is None, "the encode ended before the interrupt"
    proc.send_signal(signal.SIGINT)
    stdout, after = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, "".join(before) + after
    assert "Traceback" not in after and "KeyboardInterrupt" not in after, after
    # Besides the progress bar's lines, the interrupt says one thing.
    said = [line for line in after.splitlines() if line.strip() and not line.startswith("encoding:")]
    assert said == ["fused-moonvit encode: interrupted; nothing was written"], after
    assert "wrote" not in stdout
    assert os.listdir(out.parent) == []


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("bench", [["encoder", "--sets", "1x4x4"], ["kernels", "--sets", "one"], ["fallback"]],
                         ids=lambda b: b[0])
def test_bench_smoke_from_the_repository_root_leaves_the_committed_results(tmp_path, bench):
    """Run as the README suggests, from the repository root: the smoke run writes into a new temporary
    directory, says so, and the committed results are byte for byte what they were."""
    import fused_moonvit.benchmarks

    root = Path(fused_moonvit.benchmarks.__file__).resolve().parents[1]
    committed = root / "benchmarks" / "results"
    before = _files(committed)
    assert "encoder.json" in before
    script = Path(sys.executable).with_name("fused-moonvit")
    proc = subprocess.run([str(script), "bench", *bench, "--smoke"], cwd=root, capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert _files(committed) == before
    (made,) = tmp_path.iterdir()
    assert made.name.startswith("fused-moonvit-smoke-")
    written = sorted(p.name for p in made.iterdir())
    assert written and all(str(made / name) in proc.stdout.splitlines()[-1] for name in written)
    assert proc.stdout.splitlines()[-1].startswith(f"wrote {made}{os.sep}")


# --- Kimi-K2.5: images, a folder of frames and a video file through the command, against the reference ---

from moonvit_fixtures import (KIMI_K25_PREPROCESSOR_JSON, tiny_k25_config, write_k25_checkpoint,  # noqa: E402
                              write_video)


def _k25_processors():
    pytest.importorskip("torchvision", reason="transformers' Kimi-K2.5 processors need torchvision")
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
    from transformers.models.kimi_k25.video_processing_kimi_k25 import Kimi_K25VideoProcessor

    return Kimi_K25ImageProcessor(), Kimi_K25VideoProcessor()


def _split(out, grids):
    """The reference's (sum tokens, D) output cut per item: h/2 * w/2 tokens each, whatever t."""
    return list(out.split([(h // 2) * (w // 2) for _, h, w in grids.tolist()]))


def _assert_close(got, want):
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() <= 1e-5


def test_encode_kimi_k25_images_and_frame_folder(tmp_path, capsys):
    image_proc, video_proc = _k25_processors()
    src = write_k25_checkpoint(tmp_path / "k25", tiny_k25_config(), seed=51, shards=2,
                               preprocessor=KIMI_K25_PREPROCESSOR_JSON)
    rng = np.random.default_rng(5)
    images = []
    for i, (w, h) in enumerate([(60, 30), (45, 100)]):
        images.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    (tmp_path / "frames").mkdir()
    frames = rng.integers(0, 256, (7, 40, 70, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "frames" / f"frame_{i:03d}.png")
    out = tmp_path / "emb.safetensors"
    assert main(["encode", *images, "--video", str(tmp_path / "frames"), "--model", str(tmp_path / "k25"),
                 "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert "preprocessor_config.json (media_proc_cfg: images and videos)" in err
    assert f"{tmp_path / 'frames'}: 7 frames from the folder, 2 chunk(s) of up to 4 frames" in err
    assert f"{images[0]}: grid 4x6 patches -> 6 tokens x 24" in printed
    assert f"{images[1]}: grid 8x4 patches -> 8 tokens x 24" in printed
    assert (f"{tmp_path / 'frames'} chunk 0, frame_000.png to frame_003.png: grid 4x4x6 patches -> 6 tokens x 24"
            in printed)
    assert (f"{tmp_path / 'frames'} chunk 1, frame_004.png to frame_006.png: grid 3x4x6 patches -> 6 tokens x 24"
            in printed)

    # The reference, run directly on transformers' processors' outputs for all items at once.
    img = image_proc(images=[Image.open(p) for p in images], return_tensors="pt")
    vid = video_proc(videos=[frames], do_sample_frames=False, return_tensors="pt")
    assert img["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 4]]
    assert vid["video_grid_thw"].tolist() == [[4, 4, 6], [3, 4, 6]]
    want = _split(src(img["pixel_values"], img["image_grid_thw"]), img["image_grid_thw"])
    want += _split(src(vid["pixel_values_videos"], vid["video_grid_thw"]), vid["video_grid_thw"])
    keys = ["image_0", "image_1", "video_0_chunk_0", "video_0_chunk_1"]
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == keys
        assert f.metadata()["image_1"] == images[1]
        assert f.metadata()["video_0_chunk_1"] == f"{tmp_path / 'frames'}: chunk 1, frame_004.png to frame_006.png"
        for key, w in zip(keys, want):
            _assert_close(f.get_tensor(key), w)
    # the chunks differ from each other and from their frames taken as images
    assert not torch.allclose(want[2], want[3], atol=1e-3)


def test_encode_kimi_k25_video_file(tmp_path, capsys):
    _, video_proc = _k25_processors()
    av = pytest.importorskip("av")
    src = write_k25_checkpoint(tmp_path / "k25", tiny_k25_config(), seed=52)  # no processor file: defaults
    write_video(tmp_path / "clip.mp4", frames=13, fps=5)
    out = tmp_path / "emb.safetensors"
    assert main(["encode", "--video", str(tmp_path / "clip.mp4"), "--model", str(tmp_path / "k25"),
                 "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert "settings from the processor classes' defaults" in err
    # 13 frames at 5 fps are 2.6 s: int(2.6 * 2) = 5 frames at 2 fps, evenly spaced
    indices = [i * 13 // 5 for i in range(5)]
    assert indices == [0, 2, 5, 7, 10]
    assert (f"{tmp_path / 'clip.mp4'}: 5 frames sampled from a 5 fps video (the processor samples 2 fps), "
            f"2 chunk(s) of up to 4 frames") in err
    assert "chunk 0, frame 0 (0.00 s) to frame 7 (1.40 s): grid 4x4x6 patches -> 6 tokens x 24" in printed
    assert "chunk 1, frame 10 (2.00 s): grid 1x4x6 patches -> 6 tokens x 24" in printed
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames = np.stack([decoded[i] for i in indices])
    vid = video_proc(videos=[frames], do_sample_frames=False, return_tensors="pt")
    want = _split(src(vid["pixel_values_videos"], vid["video_grid_thw"]), vid["video_grid_thw"])
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == ["video_0_chunk_0", "video_0_chunk_1"]
        for key, w in zip(["video_0_chunk_0", "video_0_chunk_1"], want):
            _assert_close(f.get_tensor(key), w)


def test_demo_video_runs_kimi_k25_offline(tmp_path, capsys):
    """`--demo --video` without a checkpoint: the demo image and a generated clip through transformers'
    processors (class defaults) and the real-size Kimi-K2.5 tower with seeded random weights, labelled so."""
    _, video_proc = _k25_processors()
    out = tmp_path / "demo.safetensors"
    assert main(["encode", "--demo", "--video", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert "settings from the processor classes' defaults" in err
    assert "demo clip: 8 frames of 112x84 px, generated, 2 chunk(s) of up to 4 frames" in err
    assert "the Kimi-K2.5 / K2.6 architecture (moonvit3d, real size) with seeded random weights (seed 0)" in err
    assert "demo: grid 16x24 patches -> 96 tokens x 7168" in printed
    assert "demo clip chunk 1, frame 4 to frame 7: grid 4x6x8 patches -> 12 tokens x 7168" in printed
    assert printed.splitlines()[-1] == (f"wrote 3 float32 embeddings to {out} (seeded random weights (seed 0), "
                                        f"a demo: not meaningful)")
    with safe_open(out, framework="pt") as f:
        assert sorted(f.keys()) == ["image_0", "video_0_chunk_0", "video_0_chunk_1"]
        assert f.metadata()["weights"].startswith("seeded random weights")
        chunk = f.get_tensor("video_0_chunk_0")
    # The first chunk again: the same clip through the video processor, into the same random model.
    from fused_moonvit.moonvit.cli import _demo_clip
    from fused_moonvit.moonvit.config import moonvit3d_fields

    frames, _ = _demo_clip()
    vid = video_proc(videos=[frames[:4]], do_sample_frames=False, return_tensors="pt")
    assert vid["video_grid_thw"].tolist() == [[4, 6, 8]]
    model = build_model(MoonVitReference, config=MoonVitConfig(**moonvit3d_fields({}), text_hidden_size=7168))
    _assert_close(chunk, model(vid["pixel_values_videos"], vid["video_grid_thw"]))


def test_encode_kimi_k25_in_token_limit_and_demo(tmp_path, capsys):
    _k25_processors()
    write_k25_checkpoint(tmp_path / "k25", tiny_k25_config(), seed=53, preprocessor=KIMI_K25_PREPROCESSOR_JSON)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(image)
    args = ["encode", "--demo", str(image), "--model", str(tmp_path / "k25"), "--out", str(tmp_path / "e.safetensors")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "demo: grid 16x24 patches -> 96 tokens x 24" in printed and f"{image}: grid 8x8 patches" in printed
    # 49 full patches over a limit of 16: both sides scaled by sqrt(16/49), to 57 px, padded to 84
    assert main([*args, "--in-token-limit", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"{image}: grid 6x6 patches -> 9 tokens x 24" in printed


# --- Images read as vLLM reads them: EXIF orientation, animated files, 16-bit values, and their notes ---

def _encode_in_a_subprocess(*args):
    script = Path(sys.executable).with_name("fused-moonvit")
    proc = subprocess.run([str(script), "encode", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _oriented(pixels, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def _deep(values, path):
    """A 16-bit grayscale (I;16) file of `values`."""
    Image.frombytes("I;16", values.shape[::-1], values.astype("<u2").tobytes()).save(path)


SIXTEEN_BIT_NOTE = ("16-bit integer grayscale (I;16): converted to 8 bits as vLLM converts it, clipping values to "
                    "0..255, which changes 100% of its pixels (values above 255 become white); to keep its "
                    "contrast, scale it to 0..255 before encoding or serving it")


def test_encode_turns_photos_upright_and_notes_frames_and_clipping(tmp_path):
    """One run (a new interpreter costs seconds) through Kimi-K2.5's processors; the command reads images the
    same way for Kimi-VL, whose preprocessing tests/test_images.py covers."""
    image_proc, video_proc = _k25_processors()
    src = write_k25_checkpoint(tmp_path / "k25", tiny_k25_config(), seed=61, preprocessor=KIMI_K25_PREPROCESSOR_JSON)
    rng = np.random.default_rng(61)
    stored = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)  # 60x30 px as stored, shown 30x60
    _oriented(stored, tmp_path / "portrait.png", 6)
    palette = rng.integers(0, 256, 768).tolist()
    gif = [Image.fromarray(rng.integers(0, 256, (20, 40), dtype=np.uint8), "P") for _ in range(3)]
    for frame in gif:
        frame.putpalette(palette)
    gif[0].save(tmp_path / "anim.gif", save_all=True, append_images=gif[1:], duration=100)
    _deep(rng.integers(1000, 65536, (20, 40)), tmp_path / "scan.tif")
    frames = rng.integers(0, 256, (4, 40, 30, 3), dtype=np.uint8)
    frames[2:] = 255  # the two 16-bit frames below, clipped
    (tmp_path / "frames").mkdir()
    Image.fromarray(frames[0]).save(tmp_path / "frames" / "0.png")
    _oriented(np.ascontiguousarray(np.rot90(frames[1], 1)), tmp_path / "frames" / "1.png", 6)
    for i in (2, 3):
        _deep(rng.integers(1000, 65536, (40, 30)), tmp_path / "frames" / f"{i}.png")
    images = [tmp_path / "portrait.png", tmp_path / "anim.gif", tmp_path / "scan.tif"]
    out = tmp_path / "emb.safetensors"
    proc = _encode_in_a_subprocess(*images, "--video", tmp_path / "frames", "--model", tmp_path / "k25", "--out", out)

    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: /")]
    assert notes == [f"note: {images[1]}: holds 3 frames (an animated or multi-page image); only the first is "
                     f"encoded, as vLLM encodes it",
                     f"note: {images[2]}: {SIXTEEN_BIT_NOTE}",
                     f"note: {tmp_path / 'frames'}: frame 2.png (and 1 more like it): {SIXTEEN_BIT_NOTE}"], proc.stderr
    assert "Warning" not in proc.stderr
    assert f"{images[0]}: grid 6x4 patches -> 6 tokens x 24" in proc.stdout  # upright: 30 px wide, 60 high
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(stored, -1)))  # EXIF 6: turned clockwise
    white = Image.new("RGB", (40, 20), (255, 255, 255))
    img = image_proc(images=[upright, gif[0].convert("RGB"), white], return_tensors="pt")
    vid = video_proc(videos=[frames], do_sample_frames=False, return_tensors="pt")
    assert img["image_grid_thw"].tolist() == [[1, 6, 4], [1, 2, 4], [1, 2, 4]]
    assert vid["video_grid_thw"].tolist() == [[4, 4, 4]]
    want = _split(src(img["pixel_values"], img["image_grid_thw"]), img["image_grid_thw"])
    want.append(src(vid["pixel_values_videos"], vid["video_grid_thw"]))
    with safe_open(out, framework="pt") as f:
        for key, w in zip(["image_0", "image_1", "image_2", "video_0_chunk_0"], want):
            _assert_close(f.get_tensor(key), w)
