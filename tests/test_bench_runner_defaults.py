"""The runner-defaults benchmark on the CPU: the script end to end in --smoke mode, and its kernel diff."""

import json

import pytest
import torch

from fused_moonvit.benchmarks.runner_defaults import CONFIGS, kernel_diff, main
from fused_moonvit.moonvit.runner import default_budgets, octave_budgets


@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU check; on a GPU run the benchmark")
def test_smoke_end_to_end(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "runner_defaults.json").read_text())
    assert report["smoke"] and report["command"] and report["versions"]["torch"] == torch.__version__
    assert report["sets"] == {"2x8x4": {"grids": [[8, 4], [8, 4]], "patches": 64, "own_budget": 64}}
    assert report["ladders"] == {"default": default_budgets(max_budget=256), "octave4": octave_budgets(4, 256)}
    assert list(report["configs"]) == [*CONFIGS, "default_repeat"]
    for key, entry in report["configs"].items():
        ladder, slots = CONFIGS["default" if key == "default_repeat" else key]
        assert entry["slots"] == slots
        row = entry["sets"]["2x8x4"]
        # Every configuration replays a 64-patch graph here (the smallest budget of every ladder), and on the
        # CPU in fp32 they all compute the same embeddings as one exact 16-slot graph.
        assert row["budgets"] == [64] and row["ms"] > 0 and row["replay_ms"] is None
        assert row["rel_err_vs_exact16"] <= 1e-6, key
        if ladder is not None:
            assert entry["capture"]["budgets"] == report["ladders"][ladder]
            assert entry["capture"]["capture_s"] is None  # no graphs on the CPU
    assert set(report["inputs_ms"]["2x8x4"]) == {"device_float32", "device_fp32", "cpu_fp32", "cpu_fp32_moved_first"}
    assert set(report["host_us"]) == {"2x8x4, 16 slots", "2x8x4, 64 slots"}
    assert all(v > 0 for steps in report["host_us"].values() for v in steps.values())
    padded = report["padding"]["2x8x4"]["128"]
    assert padded["budgets"] == [128] and padded["padding"] == 1.0
    # 64 patches are 16 output tokens: the smallest budget of each vLLM list, in patches.
    picks = {name: v["picks"]["2x8x4"] for name, v in report["vllm_lists"].items()}
    assert picks == {"readme_kimi_k25": 1024, "readme_kimi_vl": 1024, "vllm_034_default": 256}
    assert report["profiles"] == {} and report["compile_s"] is None
    out = capsys.readouterr().out
    assert "default_repeat" in out and "wrote " in out


def test_kernel_diff_ranks_by_size_of_the_difference():
    a = {"kernels_us": {"gemm": {"us": 100.0}, "attn": {"us": 50.0}, "only_a": {"us": 3.0}}}
    b = {"kernels_us": {"gemm": {"us": 90.0}, "attn": {"us": 70.0}, "only_b": {"us": 1.0}}}
    diff = kernel_diff(a, b)
    assert [(d["kernel"], d["diff_us"]) for d in diff] == [("attn", -20.0), ("gemm", 10.0), ("only_a", 3.0),
                                                           ("only_b", -1.0)]
