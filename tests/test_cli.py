"""The main job: `fused-moonvit encode`."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from moonvit_fixtures import kimi_vl_config_json, random_model, tiny_config, write_checkpoint
from fused_moonvit.moonvit import build_model, preprocess_image, MoonVitReference
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
                          capture_output=True, text=True, timeout=600)
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
    assert data["sets"] and all(set(r["rows"]) == set(ROWS) for r in data["sets"])
    assert (tmp_path / "encoder.png").stat().st_size > 0


def test_encode_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((14, 7300, 3), dtype=np.uint8)).save(wide)
    assert main(["encode", str(wide), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"error: {wide}: " in err and "at most 512 patches" in err and "model" not in err
    with pytest.raises(SystemExit):
        main(["encode", "--demo", "--in-token-limit", "0"])
    assert "must be >= 1, got 0" in capsys.readouterr().err
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
    assert json.loads((tmp_path / "k" / "kernels.json").read_text())["results"]
