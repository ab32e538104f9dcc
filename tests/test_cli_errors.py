"""A user's mistakes, as the command line meets them: each is one line on stderr that names the bad value,
exit status 2, no traceback, and nothing built or written first.

Every case runs the CLI in a process of its own. Importing the CLI costs seconds (torch and transformers),
so the cases are forked, one after another, from one interpreter that has imported it (forked_cases.py), and
each test reads its own result.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forked_cases import HANG_GUARD_S, run_cases
from moonvit_fixtures import (KIMI_K25_PREPROCESSOR_JSON, kimi_k25_config_json, kimi_vl_config_json, random_model,
                              tiny_config, tiny_k25_config, write_checkpoint, write_k25_checkpoint)
from fused_moonvit.benchmarks import outdir
from fused_moonvit.moonvit import cli
from fused_moonvit.moonvit.families import FAMILIES, video_families

COMMITTED_RESULTS = Path(outdir.__file__).parent / "results"

# The CLI's own main, with building a model turned into a failure that says so: every mistake here must
# be caught before that point. The cases are forked after TRIPWIRE_PRELUDE, which imports no PyAV.
TRIPWIRE_PRELUDE = "from fused_moonvit.moonvit import cli, loading"
TRIPWIRE = """
import os
import sys
if os.environ.get("TRIPWIRE_HIDE_PYAV"):
    sys.modules["av"] = None  # as where PyAV is not installed
if os.environ.get("TRIPWIRE_HIDE_MATPLOTLIB"):
    sys.modules["matplotlib"] = None  # as after the README's first command, without the bench extra
from fused_moonvit.moonvit import cli, loading

def tripped(*args, **kwargs):
    sys.stderr.write("tripwire: a model was built\\n")
    raise SystemExit(99)

loading.build_model = tripped
raise SystemExit(cli.main(sys.argv[1:]))
"""


def _tiny_checkpoint(path: Path, mutate=None, config_json=None) -> Path:
    cfg = tiny_config()
    tensors = dict(random_model(cfg, seed=31).state_dict())
    if mutate:
        mutate(tensors)
    write_checkpoint(path, tensors, kimi_vl_config_json(cfg) if config_json is None else config_json, shards=2)
    return path


def _wrong_keys(tensors):
    del tensors["vision_tower.encoder.blocks.0.wo.bias"]
    tensors["vision_tower.encoder.blocks.1.mlp.fc0.weight"] = torch.randn(7, 32)
    for i in range(5):
        tensors[f"vision_tower.encoder.blocks.{7 + i}.wo.bias"] = torch.randn(3)


def _config_without_weights(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(kimi_vl_config_json(tiny_config())))
    return path


def _unreadable_weights(path: Path) -> Path:
    _config_without_weights(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def _k25_with_frames(case_dir: Path, frames: int = 3, preprocessor=KIMI_K25_PREPROCESSOR_JSON, mutate=None) -> Path:
    """A tiny Kimi-K2.5 directory at {d}/k25 (returned) and a folder of `frames` frames at {d}/frames."""
    from PIL import Image

    if mutate is None:
        write_k25_checkpoint(case_dir / "k25", tiny_k25_config(), seed=32, preprocessor=preprocessor)
    else:
        tensors = dict(random_model(tiny_k25_config(), seed=32).state_dict())
        mutate(tensors)
        write_checkpoint(case_dir / "k25", tensors, kimi_k25_config_json(tiny_k25_config()), shards=2)
    (case_dir / "frames").mkdir()
    for i in range(frames):
        Image.new("RGB", (30, 20), (10 * i, 0, 0)).save(case_dir / "frames" / f"{i:02d}.png")
    return case_dir / "k25"


def _fixed_tokens():
    cfg = json.loads(json.dumps(KIMI_K25_PREPROCESSOR_JSON))
    cfg["media_proc_cfg"]["fixed_output_tokens"] = 64
    return cfg


def _huge_png(path: Path) -> Path:
    """A 260-megapixel PNG of one colour: 1 bit per pixel, 32 kB on disk."""
    from PIL import Image

    Image.new("1", (20000, 13000)).save(path)
    return path


def _config_only(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _file(path: Path) -> Path:
    path.write_text("")
    return path


# name -> (arguments, extra environment, what the one line must say); {d} is the case's own directory,
# {m} the path a setup function made, {out} its output path (which must never appear).
CASES = {
    "model_dir_empty": (
        lambda d: _mkdir(d / "model"), ["encode", "--demo", "--model", "{m}", "--out", "{out}"], {},
        ["no config.json in model directory '{m}'", "model.safetensors"]),
    "model_dir_missing": (
        lambda d: d / "nope", ["encode", "--demo", "--model", "{m}", "--out", "{out}"], {},
        ["--model {m} does not exist", "config.json"]),
    "model_dir_missing_for_a_video": (
        lambda d: (_k25_with_frames(d), d / "nope")[1],
        ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"], {},
        ["--model {m} does not exist; give a local model directory of Kimi-K2.5 / K2.6 or Kimi-K3 / K3.1: "
         "config.json"]),
    "config_without_weights": (
        lambda d: _config_without_weights(d / "model"), ["encode", "--demo", "--model", "{m}", "--out", "{out}"], {},
        ["no model.safetensors or model.safetensors.index.json in '{m}'"]),
    "empty_config": (
        lambda d: _tiny_checkpoint(d / "model", config_json={}), ["encode", "--demo", "--model", "{m}", "--out", "{out}"],
        {}, ["{m}/config.json describes no model this encoder reads: no vision_config",
             "a standalone MoonViT tower's fields (num_hidden_layers"]),
    # A Kimi-K2.5 config.json cut short: its model_type says what it is, so it is not read as a standalone tower.
    "k25_config_without_vision_config": (
        lambda d: _config_only(d / "model", {"model_type": "kimi_k25", "hidden_size": 7168}),
        ["encode", "--demo", "--video", "--model", "{m}", "--out", "{out}"], {},
        ["{m}/config.json names model_type 'kimi_k25' (Kimi-K2.5 / K2.6) but has no vision_config"]),
    "config_without_text_width": (
        lambda d: _config_only(d / "model", {"model_type": "kimi_vl", "vision_config": {}}),
        ["encode", "--demo", "--model", "{m}", "--out", "{out}"], {},
        ["{m}/config.json has a vision_config but no text_config.hidden_size"]),
    "checkpoint_wrong_keys": (
        lambda d: _tiny_checkpoint(d / "model", mutate=_wrong_keys),
        ["encode", "--demo", "--model", "{m}", "--out", "{out}"], {},
        ["checkpoint '{m}' does not match the model", "1 missing (vision_tower.encoder.blocks.0.wo.bias)",
         "1 misshaped (vision_tower.encoder.blocks.1.mlp.fc0.weight: checkpoint (7, 32), model (48, 32))",
         "5 unexpected (vision_tower.encoder.blocks.10.wo.bias", "and 2 more", "--debug lists them all"]),
    "checkpoint_unreadable": (
        lambda d: _unreadable_weights(d / "model"), ["encode", "--demo", "--model", "{m}", "--out", "{out}"], {},
        ["{m}/model.safetensors is not a readable safetensors file"]),
    "out_in_missing_directory": (
        lambda d: d / "no" / "such" / "emb.safetensors", ["encode", "--demo", "--out", "{m}"], {},
        ["--out {m}", "{d}/no/such does not exist"]),
    "out_is_directory": (
        lambda d: _mkdir(d / "emb"), ["encode", "--demo", "--out", "{m}"], {},
        ["--out {m} is a directory", "{m}/embeddings.safetensors"]),
    # With no visible device, torch reports no CUDA whatever the machine has.
    "device_cuda_without_cuda": (
        lambda d: d, ["encode", "--demo", "--device", "cuda", "--out", "{out}"], {"CUDA_VISIBLE_DEVICES": ""},
        ["argument --device: 'cuda': no CUDA device is available here", "--device cpu"]),
    "device_not_a_device": (
        lambda d: d, ["encode", "--demo", "--device", "gpu0", "--out", "{out}"], {},
        ["argument --device: 'gpu0' is not a device", "cpu, cuda or cuda:N"]),
    "directory_as_image": (
        lambda d: _mkdir(d / "photos"), ["encode", "{m}", "--out", "{out}"], {},
        ["{m} is a directory, not an image file"]),
    "missing_image": (
        lambda d: d / "nope.png", ["encode", "{m}", "--out", "{out}"], {}, ["no such image file: {m}"]),
    "in_token_limit_not_a_number": (
        lambda d: d, ["encode", "--demo", "--in-token-limit", "abc", "--out", "{out}"], {},
        ["argument --in-token-limit: expected a whole number >= 4, got 'abc'"]),
    "in_token_limit_below_the_smallest_grid": (
        lambda d: d, ["encode", "--demo", "--in-token-limit", "3", "--out", "{out}"], {},
        ["argument --in-token-limit: must be >= 4, got 3: the smallest grid an image can have is 2x2 patches"]),
    # Refused from the header, before Pillow's decompression-bomb check (a traceback above 179 MP) is reached.
    "image_above_the_pixel_limit": (
        lambda d: _huge_png(d / "huge.png"), ["encode", "{m}", "--out", "{out}"], {},
        ["{m} is 20000x13000 px (260 megapixels), above the limit of 250 megapixels",
         "give --max-image-pixels 260000000 (or more)"]),
    "frame_above_the_pixel_limit": (
        lambda d: (_k25_with_frames(d), _huge_png(d / "frames" / "03.png"))[0],
        ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"], {},
        ["--video {d}/frames: frame {d}/frames/03.png is 20000x13000 px (260 megapixels)"]),
    # As root, permission bits allow anything; /proc takes no new file whoever asks.
    "out_where_no_file_can_be_created": (
        lambda d: d, ["encode", "--demo", "--out", "/proc/emb.safetensors"], {},
        ["--out /proc/emb.safetensors: cannot create a file in /proc ("]),
    "video_with_kimi_vl_model": (
        lambda d: (_k25_with_frames(d), _tiny_checkpoint(d / "model"))[1],
        ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"], {},
        ["--video needs a Kimi-K2.5 / K2.6 or Kimi-K3 / K3.1 model (MoonViT3d)",
         "--model {m} holds Kimi-VL's encoder, which takes images only"]),
    "video_without_model": (
        lambda d: _k25_with_frames(d), ["encode", "--video", "{d}/frames", "--out", "{out}"], {},
        ["--video needs a Kimi-K2.5 / K2.6 or Kimi-K3 / K3.1 model", "without --model the random-weight model is "
         "Kimi-VL's"]),
    "video_without_path_or_demo": (
        lambda d: d, ["encode", "--video", "--out", "{out}"], {},
        ["--video needs a PATH", "--demo --video, with no PATH, encodes a built-in generated clip"]),
    "video_path_beside_the_demo_clip_without_model": (
        lambda d: _k25_with_frames(d), ["encode", "--demo", "--video", "--video", "{d}/frames", "--out", "{out}"], {},
        ["--video PATH needs a Kimi-K2.5 / K2.6 or Kimi-K3 / K3.1 --model DIR", "the built-in clip only"]),
    "video_folder_empty": (
        lambda d: _k25_with_frames(d, frames=0), ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"],
        {}, ["--video {d}/frames: frame folder {d}/frames holds no frame images"]),
    "video_file_without_pyav": (
        lambda d: (_k25_with_frames(d), _file(d / "clip.mp4"))[0],
        ["encode", "--video", "{d}/clip.mp4", "--model", "{m}", "--out", "{out}"], {"TRIPWIRE_HIDE_PYAV": "1"},
        ["--video {d}/clip.mp4: decoding a video file needs PyAV, which is not installed: pip install av"]),
    "video_missing": (
        lambda d: _k25_with_frames(d), ["encode", "--video", "{d}/nope.mp4", "--model", "{m}", "--out", "{out}"], {},
        ["--video {d}/nope.mp4: no such video file or frame folder"]),
    "video_frame_unreadable": (
        lambda d: (_k25_with_frames(d), _file(d / "frames" / "03.png"))[0],
        ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"], {},
        ["--video {d}/frames: frame {d}/frames/03.png cannot be read"]),
    "k25_processor_setting_unsupported": (
        lambda d: _k25_with_frames(d, preprocessor=_fixed_tokens()),
        ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"], {},
        ["--model {m}: {m}/preprocessor_config.json: fixed_output_tokens=64 has no equivalent"]),
    "k25_checkpoint_wrong_keys": (
        lambda d: _k25_with_frames(d, mutate=lambda t: t.pop("mm_projector.proj.2.weight")),
        ["encode", "--video", "{d}/frames", "--model", "{m}", "--out", "{out}"], {},
        ["checkpoint '{m}' does not match the model: 1 missing (mm_projector.proj.2.weight)"]),
    "nothing_to_encode": (
        lambda d: d, ["encode", "--out", "{out}"], {}, ["give at least one IMAGE, or --demo"]),
    "bench_unknown": (
        lambda d: d, ["bench", "nope"], {}, ["fused-moonvit bench: error", "invalid choice: 'nope'"]),
    "bench_kernels_unknown_kernel": (
        lambda d: d, ["bench", "kernels", "--smoke", "--kernels", "pos_embed,nope", "--out", "{d}"], {},
        ["fused-moonvit bench kernels: error: unknown kernel(s) ['nope']"]),
    "bench_encoder_without_matplotlib": (
        lambda d: d, ["bench", "encoder", "--smoke", "--out", "{d}"], {"TRIPWIRE_HIDE_MATPLOTLIB": "1"},
        ['fused-moonvit bench encoder: error: the plot needs matplotlib: pip install -e ".[bench]" in the '
         'fused-moonvit checkout']),
    "bench_encoder_iters": (
        lambda d: d, ["bench", "encoder", "--smoke", "--iters", "0", "--out", "{d}"], {},
        ["fused-moonvit bench encoder: error: argument --iters: must be >= 1, got 0"]),
    "bench_profile_iters": (
        lambda d: d, ["bench", "profile", "--iters", "x", "--out", "{d}"], {},
        ["fused-moonvit bench profile: error: argument --iters: expected a whole number >= 1, got 'x'"]),
    **{f"bench_{which}_out_is_a_file": (
        lambda d: _file(d / "taken"), ["bench", which, "--out", "{m}"], {},
        [f"fused-moonvit bench {which}: error: argument --out: {{m}} exists and is not a directory"])
       for which in ("encoder", "kernels", "profile", "fallback")},
    "bench_out_where_no_folder_can_be_created": (
        lambda d: d, ["bench", "encoder", "--smoke", "--out", "/proc/results"], {},
        ["fused-moonvit bench encoder: error: argument --out: cannot write into /proc ("]),
    # The committed GPU results, named outright: a smoke run refuses them.
    **{f"bench_{which}_smoke_into_committed_results": (
        lambda d: COMMITTED_RESULTS, ["bench", which, "--smoke", "--out", "{m}"], {},
        [f"fused-moonvit bench {which}: error: --out {{m}} is the committed results folder",
         "leave --out out for a temporary directory"])
       for which in ("encoder", "kernels", "fallback")},
}


# The cases whose line says which models the encoder reads, and so must name every one of them (or every one
# that takes video), as moonvit/families.py declares them.
NAMES_THE_MODELS = {"model_dir_empty": FAMILIES.values(), "empty_config": FAMILIES.values(),
                    "k25_config_without_vision_config": FAMILIES.values(),
                    "config_without_text_width": FAMILIES.values(), "model_dir_missing": FAMILIES.values(),
                    "model_dir_missing_for_a_video": video_families(), "video_with_kimi_vl_model": video_families(),
                    "video_without_model": video_families(),
                    "video_path_beside_the_demo_clip_without_model": video_families()}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --debug's cases run with the mistakes' cases: a model directory that does not exist, the flag or the variable.
DEBUG_CASES = {f"debug_{how}": ["encode", "--demo", "--model", "{d}/nope", *extra]
               for how, extra in (("env", []), ("flag", ["--debug"]))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """name -> (process, every path under its directory before it ran, the fill-ins of its placeholders)."""
    prepared = {}
    for name, (setup, args, env, _) in CASES.items():
        case_dir = tmp_path_factory.mktemp(name)
        fill = {"d": str(case_dir), "m": str(setup(case_dir)), "out": str(case_dir / "out.safetensors")}
        prepared[name] = ([a.format(**fill) for a in args], env, fill, _tree(case_dir))
    for name, args in DEBUG_CASES.items():
        case_dir = tmp_path_factory.mktemp(name)
        fill = {"d": str(case_dir)}
        env = {"FUSED_MOONVIT_DEBUG": "1"} if name == "debug_env" else {}
        prepared[name] = ([a.format(**fill) for a in args], env, fill, _tree(case_dir))
    procs = run_cases(TRIPWIRE_PRELUDE, TRIPWIRE, {name: (args, env) for name, (args, env, _, _) in prepared.items()})
    return {name: (procs[name], before, fill) for name, (_, _, fill, before) in prepared.items()}


def assert_one_line_error(proc, needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "tripwire" not in proc.stderr and "ready on" not in proc.stderr, "a model was built first"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_error_before_any_work(results, name):
    proc, before, fill = results[name]
    line = assert_one_line_error(proc, [n.format(**fill) for n in CASES[name][3]])
    assert "_int" not in line and "_device" not in line, "the message names no internal function"
    # Nothing was written: no output file, no partial file, not even inside a directory given as --out.
    assert _tree(Path(fill["d"])) == before


@pytest.mark.parametrize("name", list(NAMES_THE_MODELS))
def test_a_line_about_the_models_names_those_the_encoder_reads(results, name):
    proc, _, _ = results[name]
    for family in NAMES_THE_MODELS[name]:
        assert family.title in proc.stderr, (family.title, proc.stderr)


def test_wrong_keys_line_names_three_per_kind(results):
    proc, _, _ = results["checkpoint_wrong_keys"]
    # the missing key, then three of the five unexpected ones
    assert proc.stderr.count("wo.bias") == 4


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(results, how):
    proc, _, fill = results[f"debug_{how}"]
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and f"UsageError: --model {fill['d']}/nope does not exist" in proc.stderr


def test_version_from_the_package_metadata():
    from importlib.metadata import version

    script = Path(sys.executable).with_name("fused-moonvit")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fused-moonvit {version('fused-moonvit')}"


def test_cuda_float32_is_refused_before_any_work(monkeypatch, capsys):
    """The CUDA path's own checks, run where a CUDA device is reported."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["encode", "--demo", "--device", "cuda", "--dtype", "float32"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fused-moonvit encode: error: --dtype float32: the fused encoder runs in bfloat16 or float16 on CUDA "
        "(FlashAttention); use --dtype bfloat16, or --device cpu for float32"]
    with pytest.raises(SystemExit) as exited:
        cli.main(["encode", "--demo", "--device", "cuda:1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fused-moonvit encode: error: argument --device: 'cuda:1': this machine has 1 CUDA device(s), cuda:0 to "
        "cuda:0"]


# The offline vLLM example, where vLLM cannot be imported (as in the environment of the README's first
# command), run as `python -m` runs it.
WITHOUT_VLLM = """
import runpy
import sys
sys.modules["vllm"] = None  # as where vLLM is not installed
sys.argv[0] = "example_offline"
runpy.run_module("fused_moonvit.integration.example_offline", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("case", ["no_vllm", "missing_image"])
def test_offline_example_without_vllm(tmp_path, case):
    from PIL import Image

    image = tmp_path / "photo.png"
    if case == "no_vllm":
        Image.new("RGB", (28, 28)).save(image)
    proc = subprocess.run([sys.executable, "-c", WITHOUT_VLLM, "--image", str(image)], capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
    prog = "python -m fused_moonvit.integration.example_offline: error: "
    assert proc.returncode == 2, proc.stderr
    no_vllm = ('vLLM is not installed in this environment; install it with: pip install -e ".[vllm]" in the '
               'fused-moonvit checkout')
    assert proc.stderr.splitlines() == [prog + (no_vllm if case == "no_vllm" else
                                                f"--image {image}: no such image file")], proc.stderr
    assert proc.stdout == ""
