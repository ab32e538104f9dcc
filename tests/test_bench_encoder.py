"""The encoder benchmark on the CPU: vLLM's way (the host-metadata graph and the eager MoonViT3d tower)
against the reference, the FLOP count, and the script end to end in --smoke mode."""

import json

import pytest
import torch

from moonvit_fixtures import K3_OPTIONS, random_model, random_pixels, rel_err, tiny_config, tiny_k25_config
from fused_moonvit.benchmarks.bench_encoder import main, vllm_call
from fused_moonvit.benchmarks.flops import encoder_flops, encoder_flops_breakdown
from fused_moonvit.benchmarks import hostmeta
from fused_moonvit.benchmarks.hostmeta import BASELINE_ROPE, HostMetadataGraph, VllmEagerTower
from fused_moonvit.moonvit import MoonVitConfig
from fused_moonvit.moonvit.runner import default_budgets

# (grids, budget, image slots): exact fit, padding rows and unused slots, the table's own size (the
# identity interpolation), up- and downsampling of the 16x16 table, many images.
CASES = [
    ([(4, 6)], 24, 1),
    ([(4, 6)], 64, 3),
    ([(16, 16)], 256, 1),
    ([(2, 2), (6, 10), (16, 16), (20, 12)], 640, 4),
    ([(8, 8)] * 5, 320, 6),
]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=3)


@pytest.mark.parametrize("grids,budget,slots", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_host_metadata_matches_reference(model, grids, budget, slots):
    graph = HostMetadataGraph(model, budget, slots)
    assert not graph.graphed
    pixels = random_pixels(grids, seed=len(grids))
    expected = model(pixels, torch.tensor(grids))
    out = graph(pixels, grids)
    assert out.shape == expected.shape
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("tower", ["moonvit", "moonvit3d"])
def test_buffers_reused_across_calls_and_padding_isolated(model, tower):
    """Later calls see what earlier ones left in the buffers; poisoned padding rows must not leak, also
    where MoonViT3d's in-place RoPE kernel rotates them by their poisoned freqs_cis rows."""
    if tower == "moonvit3d":
        model = random_model(tiny_k25_config(), seed=3)
    graph = HostMetadataGraph(model, 640, 4)
    for seed, grids in enumerate([[(20, 12), (16, 16)], [(2, 2)], [(6, 10), (4, 4), (2, 2)]]):
        total = sum(h * w for h, w in grids)
        graph.pixel_values[total:] = float("nan")
        graph.pos_embeds[total:] = float("nan")
        graph.freqs_cis[total:] = complex("nan+nanj")
        pixels = random_pixels(grids, seed=seed)
        out = graph(pixels, grids)
        assert torch.isfinite(out).all()
        assert rel_err(out, model(pixels, torch.tensor(grids))) <= 1e-5


@pytest.mark.parametrize("k3", [False, True], ids=["k25", "k3"])
def test_host_metadata_moonvit3d(k3):
    """MoonViT3d images through the host-metadata graph (bilinear and RMSNorm for K3's options); video
    chunks are refused there and run through vLLM's eager tower in the benchmark's vLLM-style call, whose
    outputs come back in item order."""
    model = random_model(tiny_k25_config(**(K3_OPTIONS if k3 else {})), seed=4)
    graph = HostMetadataGraph(model, 320, 4)
    images = [(1, 6, 10), (1, 16, 16)]
    pixels = random_pixels(images, seed=5)
    assert rel_err(graph(pixels, images), model(pixels, torch.tensor(images))) <= 1e-5
    items = [(1, 6, 10), (3, 4, 4), (1, 2, 2), (2, 6, 2)]
    pixels = random_pixels(items, seed=6)
    with pytest.raises(ValueError, match="item 1 has t=3 frames: vLLM's encoder graphs"):
        graph(pixels, items)
    eager = VllmEagerTower(model, "fa2")
    want = model(pixels, torch.tensor(items))
    assert rel_err(eager(pixels, items), want) <= 1e-5
    assert rel_err(vllm_call(graph, eager, pixels, items)(), want) <= 1e-5
    chunks = [(3, 4, 4), (2, 6, 2)]
    pixels = random_pixels(chunks, seed=7)
    assert rel_err(vllm_call(None, eager, pixels, chunks)(), model(pixels, torch.tensor(chunks))) <= 1e-5


@pytest.mark.parametrize("config", [tiny_config(), tiny_k25_config()], ids=["moonvit", "moonvit3d"])
def test_rope_as_vllm_applies_it(config, monkeypatch):
    """MoonViT3d's baseline rotates q and k with the packed kernel, once per layer, in both vLLM paths;
    Kimi-VL's MoonVit never calls it (vLLM 0.34 rotates through complex tensors there)."""
    calls = []

    def counted(qkv, freqs_cis):
        calls.append(qkv.data_ptr())
        return packed_qk_rope_(qkv, freqs_cis)

    packed_qk_rope_ = hostmeta.packed_qk_rope_
    monkeypatch.setattr(hostmeta, "packed_qk_rope_", counted)
    model = random_model(config, seed=8)
    grids = [(1, 6, 10), (1, 4, 4)] if config.tower == "moonvit3d" else [(6, 10), (4, 4)]
    pixels = random_pixels(grids, seed=9)
    want = model(pixels, torch.tensor(grids))
    assert rel_err(HostMetadataGraph(model, 128, 2)(pixels, grids), want) <= 1e-5
    assert rel_err(VllmEagerTower(model, "fa2")(pixels, grids), want) <= 1e-5
    in_place = config.tower == "moonvit3d"
    assert len(calls) == (2 * config.num_hidden_layers if in_place else 0)
    assert set(BASELINE_ROPE) == {"moonvit", "moonvit3d"}
    assert ("packed QKV buffer" in hostmeta.baseline_rope(config.tower)) == in_place
    with pytest.raises(ValueError, match="tower must be one of moonvit3d, moonvit, got 'vit'"):
        hostmeta.baseline_rope("vit")


def test_host_metadata_rejects_what_does_not_fit(model):
    graph = HostMetadataGraph(model, 64, 2)
    with pytest.raises(ValueError, match="3 images exceed this graph's 2 image slots"):
        graph(random_pixels([(2, 2)] * 3), [(2, 2)] * 3)
    with pytest.raises(ValueError, match="80 patches, more than this graph's budget of 64"):
        graph(random_pixels([(8, 10)]), [(8, 10)])
    with pytest.raises(ValueError, match="multiple of 4"):
        HostMetadataGraph(model, 30, 1)
    with pytest.raises(ValueError, match="max_images"):
        HostMetadataGraph(model, 64, 0)
    with pytest.raises(ValueError, match="CUDA graph needs the model on a CUDA device"):
        HostMetadataGraph(model, 64, 1, graph=True)
    with pytest.raises(ValueError, match="attention must be one of fa3, fa2, got 'sdpa'"):
        HostMetadataGraph(model, 64, 1, attention="sdpa")
    with pytest.raises(RuntimeError, match="vLLM's FA3 cannot run on cpu"):
        VllmEagerTower(model, "fa3")


def test_flops_hand_count():
    cfg = tiny_config()  # hidden 32, MLP 48, 2 layers, patch 14, text 24
    grids = [(4, 6), (2, 2)]  # 24 + 4 patches, 6 + 1 output tokens
    patch_embed = 2 * (3 * 14 * 14) * 32 * 28
    per_token_layer = 2 * (32 * 96 + 32 * 32 + 32 * 48 + 48 * 32)
    attention = 2 * (2 * 24 * 32 + 2 * 24 * 32) * 24 + 2 * (2 * 4 * 32 + 2 * 4 * 32) * 4
    projector = 2 * (128 * 128 + 128 * 24) * 7
    expected = patch_embed + 2 * per_token_layer * 28 + attention + projector
    assert encoder_flops(grids, cfg) == expected == 2_280_448
    assert encoder_flops_breakdown(grids, tiny_config(text_hidden_size=None))["projector"] == 0


@pytest.mark.parametrize("config,grids", [
    (tiny_config(), [(4, 6), (2, 2), (20, 12)]),
    (MoonVitConfig(), [(16, 16), (32, 32), (24, 40)]),
    (MoonVitConfig(text_hidden_size=None), [(64, 64), (2, 2)]),
], ids=["tiny", "real", "real_tower_only"])
def test_flops_match_pytorchs_count_of_the_reference(config, grids):
    """Counted another way: PyTorch's FLOP counter over the reference forward (on the meta device, so the
    real size costs nothing), with attention on the math backend so its two matrix products are counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fused_moonvit.moonvit import MoonVitReference

    with torch.device("meta"):
        model = MoonVitReference(config)
        pixels = torch.empty(sum(h * w for h, w in grids), 3, config.patch_size, config.patch_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(pixels, torch.tensor(grids))
    assert encoder_flops(grids, config) == counter.get_total_flops()


def test_flops_real_config_matches_design():
    parts = encoder_flops_breakdown([(32, 32)], MoonVitConfig())
    assert parts["layer_gemms"] / 1024 == pytest.approx(0.822e9, rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU check; on a GPU run the benchmark")
def test_smoke_end_to_end(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "encoder.json").read_text())
    with open(tmp_path / "encoder.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report["smoke"] and report["targets_apply"] is False
    assert report["baseline_rope"] == BASELINE_ROPE["moonvit"]
    assert report["command"] and report["versions"]["torch"] == torch.__version__
    assert [s["name"] for s in report["sets"]] == ["1x4x4", "3mix", "3mix-in-512"]
    assert [s["budget"] for s in report["sets"]] == [64, 192, 512]
    default = report["default_runner"]
    assert default["budgets"] == default_budgets() and default["max_items"] == 64
    for s in report["sets"]:
        # No FA3 on a CPU: vLLM's way is the FA2 row, and the ratios say so.
        assert set(s["rows"]) == {"reference_eager", "vllm_fa2", "fused_triton", "fused_graph", "fused_default"}
        assert s["vllm_row"] == "vLLM's way, FA2"
        assert s["speedup_of_fused_over"]["vllm"] == s["speedup_of_fused_over"]["vllm_fa2"]
        assert s["rows"]["fused_triton"]["attention"] == "triton"
        assert all(s["rows"][k]["budget"] == s["budget"] for k in ("vllm_fa2", "fused_triton", "fused_graph"))
        # The default runner replays the smallest default budget that holds the set, whatever its own budget.
        assert s["rows"]["fused_default"]["budgets"] == [min(b for b in default_budgets() if b >= s["patches"])]
        assert all(row["ms"] > 0 and row["tflops"] > 0 for row in s["rows"].values())
        assert all(s["outputs_finite"].values())
        # fp32 on the CPU: both graph paths agree with the reference to rounding.
        assert max(s["rel_err_vs_reference_eager"].values()) <= 1e-4
        assert s["flops"] == encoder_flops([tuple(g) for g in s["grids"]], tiny_config())


@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU check; on a GPU run the benchmark")
def test_smoke_moonvit3d(tmp_path):
    assert main(["--smoke", "--model", "kimi-k25", "--sets", "1x4x4,video-mix", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "encoder-kimi-k25.json").read_text())
    assert report["model"] == "kimi-k25" and report["config"]["tower"] == "moonvit3d"
    assert report["baseline_rope"] == BASELINE_ROPE["moonvit3d"]
    video = report["sets"][1]
    assert video["name"] == "video-mix" and video["patches"] == 24 + 64 + 24 and video["output_tokens"] == 6 + 4 + 3
    assert all(video["outputs_finite"].values()) and max(video["rel_err_vs_reference_eager"].values()) <= 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU check; on a GPU run the benchmark")
def test_rows_option_times_only_those(tmp_path):
    assert main(["--smoke", "--sets", "1x4x4", "--rows", "vllm_fa2,fused_graph", "--out", str(tmp_path)]) == 0
    (only,) = json.loads((tmp_path / "encoder.json").read_text())["sets"]
    assert set(only["rows"]) == {"vllm_fa2", "fused_graph"}
    # Every path still ran once, for the errors against the reference, but the default runner: its whole
    # ladder is captured only when its row is timed.
    assert set(only["rel_err_vs_reference_eager"]) == {"vllm_fa2", "fused_triton", "fused_graph"}


def test_bad_set_name_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--smoke", "--sets", "1x4x4,nope", "--out", str(tmp_path)])
    assert "unknown image set(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--smoke", "--rows", "fused_graph,host_metadata_graph", "--out", str(tmp_path)])
    assert "unknown row(s) host_metadata_graph" in capsys.readouterr().err
