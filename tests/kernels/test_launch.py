"""The launch tables (kernels/launch.py): every kernel's table has the interpreter's row and an sm90 row, the
launchers launch with the settings measured before the tables existed, and a GPU of a class no table names
takes the sm90 rows.

The launches are recorded, not run: each kernel is replaced by a recorder and the launch class is set by
the test, so the GPU settings are checked on CPU tensors too."""

import pytest
import torch

from fused_moonvit.kernels import attention, launch, layernorm, patch_merge, plan, pos_embed, rope2d
from fused_moonvit.kernels.attention import AttentionConfig
from fused_moonvit.kernels.layernorm import LayerNormConfig
from fused_moonvit.kernels.plan import META_ROWS

TABLES = {
    "pos_embed": pos_embed.POS_EMBED_LAUNCH,
    "rope2d": rope2d.ROPE_2D_LAUNCH,
    "layernorm": layernorm.LAYER_NORM_LAUNCH,
    "patch_merge": patch_merge.MERGE_PATCHES_LAUNCH,
    "expand_plan": plan.EXPAND_PLAN_LAUNCH,
    "varlen_attention": attention.VARLEN_ATTENTION_LAUNCH,
    "zero_padding_rows": attention.ZERO_PADDING_ROWS_LAUNCH,
}
H100_SMS = 132


@pytest.mark.parametrize("name", TABLES)
def test_every_table_has_the_interpreter_row_and_an_sm90_row(name):
    classes = [row["device_class"] for row in TABLES[name]]
    assert classes.count("cpu") == 1 and "sm90" in classes


def test_select_row_matches_exact_keys_then_bounds_and_a_row_without_a_key_takes_any_value():
    rows = [{"device_class": "sm90", "head_dim": 72, "max_budget": 2048, "s": 1},
            {"device_class": "sm90", "head_dim": 72, "max_budget": 16384, "s": 2},
            {"device_class": "sm90", "max_budget": 4096, "s": 3},
            {"device_class": "cpu", "s": 4}]
    assert launch.select_row(rows, device_class="sm90", head_dim=72, budget=2048)["s"] == 1
    assert launch.select_row(rows, device_class="sm90", head_dim=72, budget=2052)["s"] == 2
    # Past every bound of the rows that match exactly: the last of them (the largest measured).
    assert launch.select_row(rows, device_class="sm90", head_dim=72, budget=32768)["s"] == 3
    assert launch.select_row(rows, device_class="sm90", head_dim=128, budget=8192)["s"] == 3
    assert launch.select_row(rows, device_class="cpu", head_dim=72, budget=1 << 20)["s"] == 4
    assert launch.select_row(rows, device_class="sm80", head_dim=72, budget=256) is None


def test_device_class():
    assert launch.device_class("cpu") == launch.device_class(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert launch.device_class("cuda") == f"sm{major}{minor}"


class Recorder:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` records the grid and keyword arguments."""

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.grid, self.kwargs = tuple(grid), kwargs
        return run


@pytest.fixture(params=["cpu", "sm90", "sm100"])
def launch_class(request, monkeypatch):
    """The class a launch is looked up for: the interpreter ("cpu"), an H100 ("sm90"), or a GPU no table
    names ("sm100"), which must launch as sm90 does."""
    cls = request.param
    monkeypatch.setattr(launch, "check_launchable", lambda kernel, device: cls == "cpu")
    monkeypatch.setattr(launch, "device_class", lambda device: cls)
    monkeypatch.setattr(pos_embed, "_sm_count", lambda device: H100_SMS)
    return "cpu" if cls == "cpu" else "sm90"


def record(monkeypatch, module, kernel_name):
    recorder = Recorder()
    monkeypatch.setattr(module, kernel_name, recorder)
    return recorder


def cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("budget", [1024, 8192])
def test_pos_embed_launch(launch_class, monkeypatch, budget):
    k = record(monkeypatch, pos_embed, "_interp_pos_embed_kernel")
    x = torch.empty(budget, 1152, dtype=torch.bfloat16)
    pos_embed.interp_pos_embed(x, torch.empty(64, 64, 1152, dtype=torch.bfloat16),
                               torch.zeros(META_ROWS, budget, dtype=torch.int32))
    if launch_class == "cpu":
        expected = dict(BLOCK_T=1024, BLOCK_C=64, CHUNKS=18, num_warps=8)
        grid = (cdiv(budget, 1024), 1)
    elif budget // 16 >= 2 * H100_SMS:  # enough token blocks: every channel block in one program
        expected = dict(BLOCK_T=16, BLOCK_C=128, CHUNKS=9, num_warps=8)
        grid = (budget // 16, 1)
    else:
        expected = dict(BLOCK_T=16, BLOCK_C=128, CHUNKS=1, num_warps=8)
        grid = (budget // 16, 9)
    assert k.grid == grid and {n: k.kwargs[n] for n in expected} == expected


@pytest.mark.parametrize("heads,head_dim", [(16, 72), (12, 128)])
def test_rope_2d_launch(launch_class, monkeypatch, heads, head_dim):
    k = record(monkeypatch, rope2d, "_rope_2d_kernel")
    budget, pairs = 1024, heads * head_dim
    rope2d.apply_rope_2d(torch.empty(budget, 3 * pairs), torch.zeros(META_ROWS, budget, dtype=torch.int32),
                         torch.empty(512, head_dim // 4, 2), heads, head_dim)
    block_t, block_p = (256, 1024) if launch_class == "cpu" else (4, 256)
    assert k.grid == (budget // block_t, cdiv(pairs, block_p))
    assert (k.kwargs["BLOCK_T"], k.kwargs["BLOCK_P"], k.kwargs["num_warps"]) == (block_t, block_p, 8)


@pytest.mark.parametrize("config", [None, LayerNormConfig(2, 8)], ids=["table", "config"])
@pytest.mark.parametrize("channels", [1152, 64])
def test_layer_norm_launch(launch_class, monkeypatch, config, channels):
    k = record(monkeypatch, layernorm, "_add_layer_norm_kernel")
    rows = 1024
    x, w = torch.empty(rows, channels), torch.ones(channels)
    layernorm.add_layer_norm(x, x.clone(), w, w.clone(), 1e-6, config=config)
    if launch_class == "cpu":
        block_r = 16384 // (2048 if channels == 1152 else 64)
    else:
        block_r = 1 if config is None else config.rows_per_program
    num_warps = 4 if config is None else config.num_warps
    assert k.grid == (rows // block_r,) and (k.kwargs["BLOCK_R"], k.kwargs["num_warps"]) == (block_r, num_warps)


@pytest.mark.parametrize("channels", [1152, 64])
def test_merge_patches_launch(launch_class, monkeypatch, channels):
    k = record(monkeypatch, patch_merge, "_merge_patches_kernel")
    budget = 1024
    patch_merge.merge_patches(torch.empty(budget, channels), torch.zeros(META_ROWS, budget, dtype=torch.int32))
    block_c = 2048 if channels == 1152 else 64
    # One merged token (four rows) per program on the GPU at the models' widths.
    block_r = max(4, (16384 if launch_class == "cpu" else 2048) // block_c)
    assert k.grid == (budget // block_r,) and (k.kwargs["BLOCK_R"], k.kwargs["num_warps"]) == (block_r, 4)


def test_expand_plan_launch(launch_class, monkeypatch):
    k = record(monkeypatch, plan, "_expand_plan_kernel")
    budget = 16384
    plan.expand_plan(torch.zeros(plan.plan_numel(8), dtype=torch.int32), plan.new_token_meta(budget, "cpu"))
    block = 4096 if launch_class == "cpu" else 256
    assert k.grid == (budget // block,) and (k.kwargs["BLOCK"], k.kwargs["num_warps"]) == (block, 4)


@pytest.mark.parametrize("config", [AttentionConfig(), AttentionConfig(128, 64, 8, 3)], ids=["default", "128x64"])
def test_varlen_attention_launch(launch_class, monkeypatch, config):
    k = record(monkeypatch, attention, "_varlen_attention_kernel")
    budget, heads = 4096, 16
    attention.varlen_attention_fwd(torch.empty(budget, 3 * heads * 72), torch.tensor([0, budget], dtype=torch.int32),
                                   heads, 72, config=config)
    programs = budget // config.block_m + 4
    assert k.grid == ((4 if launch_class == "cpu" else programs), heads)
    assert (k.kwargs["BLOCK_M"], k.kwargs["BLOCK_N"]) == (config.block_m, config.block_n)
    assert (k.kwargs["num_warps"], k.kwargs["num_stages"]) == (config.num_warps, config.num_stages)


def test_zero_padding_rows_launch(launch_class, monkeypatch):
    k = record(monkeypatch, attention, "_zero_padding_rows_kernel")
    attention.zero_padding_rows(torch.empty(1000, 3456), torch.tensor([0, 1000], dtype=torch.int32))
    assert k.grid == (cdiv(1000, 16),) and (k.kwargs["BLOCK_ROWS"], k.kwargs["BLOCK_COLS"]) == (16, 256)
    assert "num_warps" not in k.kwargs  # Triton's default, as before the table
