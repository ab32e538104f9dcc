"""The fallback and pixel-copy benchmark on the CPU: its batches, and the script end to end in --smoke mode."""

import json

import pytest

from fused_moonvit.benchmarks.bench_fallback import IMAGE_SIDE, batch_grid, main


@pytest.mark.parametrize("tokens", [5184, 5120, 64, 1028])
def test_batch_grid_holds_exactly_the_tokens(tokens):
    grid = batch_grid(tokens, IMAGE_SIDE)
    assert sum(h * w for h, w in grid) == 4 * tokens
    assert all(h % 2 == 0 and w % 2 == 0 and max(h, w) <= 512 for h, w in grid)
    assert grid[: tokens // 1024] == [[64, 64]] * (tokens // 1024)


def test_smoke_run_writes_every_row(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "fallback.json").read_text())
    fallback = report["beyond_largest_budget"]
    assert fallback["batch_tokens"] == 80 and fallback["largest_budget"] == 64
    assert sum(h * w for h, w in fallback["grid"]) == 320
    assert sorted(fallback["rows"]) == sorted(["eager_forward", "one_replay_at_96", "one_replay_at_80",
                                               "two_replays_64_and_16", "full_batch_one_replay_at_64"])
    for name, row in fallback["rows"].items():
        assert row["ms"] > 0
        if row["tokens"] == 80:  # every way of running the batch computes the same embeddings
            assert row["max_abs_diff_vs_eager"] <= 1e-4, name
    copies = report["pixel_copies"]
    assert [(c["token_budget"], c["fill_percent"]) for c in copies] == [(64, 10), (64, 50), (64, 90)]
    assert all(c["clear_and_copy_us"] > 0 and c["copy_valid_rows_us"] > 0 for c in copies)


@pytest.mark.parametrize("args,message", [
    (["--over", "6"], "--over must be a multiple of 4 tokens, got 6"),
    (["--next-budget", "5000"], "--next-budget 5000 does not hold the batch of 5184 tokens"),
    (["--fills", "0"], "--fills must be percentages in 1..100, got [0]"),
])
def test_refuses_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit):
        main(args + ["--out", "unused"])
    err = capsys.readouterr().err
    assert message in err, err
