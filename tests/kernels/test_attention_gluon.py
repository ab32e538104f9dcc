"""The Gluon attention's host side on any machine, its build for sm_90a where Triton has Gluon, and its
numbers on a Hopper GPU. Its results on the GPU are also held to every check of the other backends in
test_attention_backends.py (random plans, NaN confinement, graph replay under new plans); off Hopper that
file checks the backend is refused by name."""

import json
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import generator, randn

from fused_moonvit.kernels._gluon import GLUON_MISSING
from fused_moonvit.kernels.attention_gluon import (GluonAttentionConfig, config_unsupported, gluon_attention_fwd,
                                                   gluon_unavailable_reason, head_dim_unsupported)
from fused_moonvit.moonvit.attention import attention_table, choose_attention

needs_gluon = pytest.mark.skipif(GLUON_MISSING is not None, reason=str(GLUON_MISSING))


@pytest.mark.parametrize("head_dim", [64, 72, 80, 128])
def test_head_dims_taken(head_dim):
    assert head_dim_unsupported(head_dim) is None


@pytest.mark.parametrize("head_dim", [8, 48, 96, 100, 112, 136, 256])
def test_head_dims_refused_by_value(head_dim):
    assert f"got {head_dim}" in head_dim_unsupported(head_dim)


def test_unavailable_off_hopper_says_why(device):
    if device.type == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        assert gluon_unavailable_reason(device, 72) is None
        assert "got 96" in gluon_unavailable_reason(device, 96)
    else:
        assert gluon_unavailable_reason(device, 72) is not None
        with pytest.raises(RuntimeError, match="attention backend 'gluon' cannot run on"):
            choose_attention(1024, device, 72, "gluon")


@pytest.mark.parametrize("fields,bad", [
    (dict(block_m=96), "block_m"), (dict(block_m=32), "block_m"), (dict(block_m=512), "block_m"),
    (dict(block_m=256, groups=1, pingpong=False), "groups"),
    (dict(block_n=48), "block_n"),
    (dict(block_n=256), "block_n"), (dict(block_n=96), "block_n"), (dict(stages=0), "stages"), (dict(groups=3), "groups"),
    (dict(block_m=64, groups=2), "groups"), (dict(block_m=192, groups=2), "groups"), (dict(block_m=128, groups=3), "groups"),
    (dict(block_m=192, groups=3, p_shared=False), "p_shared"), (dict(block_m=192, groups=3, consumer_regs=168), "168"),
    (dict(consumer_regs=248), "248"), (dict(producer_regs=8), "producer_regs"),
    (dict(overlap=False), "pingpong"), (dict(groups=1), "pingpong"),
])
def test_config_refuses_bad_tiles(fields, bad):
    with pytest.raises(ValueError, match=bad):
        GluonAttentionConfig(**fields)


@pytest.mark.parametrize("head_dim", [64, 72, 80])
def test_128_rows_per_warp_group_up_to_head_dim_80(head_dim):
    assert config_unsupported(GluonAttentionConfig(block_m=256, block_n=64), head_dim) is None
    assert config_unsupported(GluonAttentionConfig(block_m=192, groups=3), head_dim) is None
    assert config_unsupported(GluonAttentionConfig(), head_dim) is None


def test_register_budgets_follow_the_groups():
    assert GluonAttentionConfig().regs == 240
    assert GluonAttentionConfig(block_m=192, groups=3).regs == 160
    assert GluonAttentionConfig(block_m=192, groups=3, consumer_regs=152).regs == 152
    assert "got 128" in config_unsupported(GluonAttentionConfig(block_m=192, groups=3), 128)


def test_128_rows_per_warp_group_refused_at_head_dim_128(device):
    wide = GluonAttentionConfig(block_m=256, block_n=64)
    assert "got 128" in config_unsupported(wide, 128)
    assert config_unsupported(GluonAttentionConfig(), 128) is None
    assert "got 96" in config_unsupported(GluonAttentionConfig(), 96)
    qkv = torch.zeros(8, 3 * 128, dtype=torch.bfloat16, device=device)
    cu = torch.tensor([0, 8, 8], dtype=torch.int32, device=device)
    if gluon_unavailable_reason(device) is None:
        with pytest.raises(ValueError, match="block_m 256 .* got 128"):
            gluon_attention_fwd(qkv, cu, 1, 128, config=wide)


def test_launcher_checks_arguments_before_any_work(device):
    cu = torch.tensor([0, 8, 8], dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="qkv must have dtype"):
        gluon_attention_fwd(torch.zeros(8, 3 * 72, device=device), cu, 1, 72)
    with pytest.raises(ValueError, match=r"qkv must have shape \(\*, 432\)"):
        gluon_attention_fwd(torch.zeros(8, 3 * 72, dtype=torch.bfloat16, device=device), cu, 2, 72)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype"):
        gluon_attention_fwd(torch.zeros(8, 3 * 72, dtype=torch.bfloat16, device=device), cu.long(), 1, 72)


def test_table_rows_name_valid_configs():
    """Every Gluon entry of the committed table builds a config (a typo would only fail on a GPU)."""
    for row in attention_table()["rows"]:
        for entry in row["ranking"]:
            if entry["backend"] == "gluon":
                GluonAttentionConfig(**entry["config"])


# Compiles in a process of its own: this one may run kernels under the Triton interpreter, which wraps the
# kernel's helpers for interpretation. Prints each build's resources as cuobjdump reports them.
BUILD = """
import json, os, re, subprocess, sys, tempfile
import triton
from fused_moonvit.kernels.attention_gluon import GluonAttentionConfig, compile_for_sm90
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for heads, head_dim, fields in json.loads(sys.argv[1]):
    kernel = compile_for_sm90(heads, head_dim, GluonAttentionConfig(**fields))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    ptx = kernel.asm["ptx"]
    out.append({"resources": {k: int(v) for k, v in re.findall(r"\\b(REG|STACK|LOCAL|SHARED):(\\d+)", usage.stdout)},
                "wgmma": "wgmma.mma_async" in ptx, "tma": "cp.async.bulk.tensor" in ptx, "setmaxnreg": "setmaxnreg" in ptx})
print(json.dumps(out))
"""
# The default tiles (what the backend runs unless the table names others: the ping-pong schedule) at the
# three head dims, with three stages, the serial schedule, 128 rows per warp group, P in registers and three
# consumer warp groups.
BUILDS = [(16, 72, {}), (12, 128, {}), (4, 64, {}), (12, 128, dict(stages=3)),
          (16, 72, dict(overlap=False, pingpong=False)), (16, 72, dict(block_m=256, block_n=64, stages=3)),
          (16, 72, dict(p_shared=False)), (16, 72, dict(block_m=192, groups=3)),
          (16, 72, dict(block_m=192, groups=3, block_n=64, stages=3, p_shared=False))]


@needs_gluon
def test_builds_for_sm90_without_spills():
    """Compiled for sm_90a by this machine's Triton (no GPU needed), at head dims 72, 128 and 64: the
    asynchronous wgmma, TMA loads and per-partition register budgets are there, and nothing spills to local
    memory (no stack frame either), also in the ping-pong schedule, which holds a score tile and P at once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", BUILD, json.dumps(BUILDS)], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    builds = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(builds) == len(BUILDS)
    for (heads, head_dim, fields), build in zip(BUILDS, builds):
        assert build["wgmma"] and build["tma"] and build["setmaxnreg"], (head_dim, fields, build)
        assert build["resources"]["LOCAL"] == 0 and build["resources"]["STACK"] == 0, (head_dim, fields, build)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or gluon_unavailable_reason("cuda") is not None,
                    reason="needs a Hopper GPU and a Triton with Gluon")
@pytest.mark.parametrize("fields", [dict(groups=1, pingpong=False), dict(groups=2, pingpong=False),
                                    dict(groups=2, pingpong=False, block_n=64, stages=3),
                                    dict(groups=2, overlap=False, pingpong=False),
                                    dict(block_m=64, groups=1, pingpong=False), {},
                                    dict(block_n=64, stages=4), dict(block_m=256, block_n=64, stages=3),
                                    dict(p_shared=False), dict(block_m=192, groups=3),
                                    dict(block_m=192, groups=3, block_n=64, stages=3, p_shared=False)],
                         ids=["g1", "g2", "g2-n64-s3", "g2-serial", "m64", "g2-pingpong", "g2-pingpong-n64-s4", "m256",
                              "p-registers", "g3", "g3-n64-p-registers"])
@pytest.mark.parametrize("heads,head_dim", [(16, 72), (12, 128), (4, 64)], ids=["d72", "d128", "d64"])
def test_configs_match_fp64(fields, heads, head_dim, device):
    """Each tile configuration on a mixed pack (a chunk, a single 2x2 image, an item shorter than a tile,
    one ending mid-tile) against fp64: error within bf16's, every row written, padding rows zeros."""
    from fused_moonvit.kernels import build_plan, new_device_plan, plan_cu_seqlens, upload_plan
    from fused_moonvit.kernels.attention import varlen_attention_reference

    items = [(1, 32, 32), (1, 2, 2), (4, 10, 12), (1, 64, 64), (1, 6, 18)]
    budget, slots = 8192, 8
    cu = plan_cu_seqlens(upload_plan(build_plan(items, budget, slots), new_device_plan(slots, device), budget=budget))
    valid = sum(t * h * w for t, h, w in items)
    qkv = randn((budget, 3 * heads * head_dim), generator(heads, head_dim), torch.bfloat16, device)
    qkv[valid:] = float("nan")
    out = torch.full((budget, heads * head_dim), float("nan"), dtype=torch.bfloat16, device=device)
    config = GluonAttentionConfig(**fields)
    if config_unsupported(config, head_dim):
        # Refused before any work, the output left as it was.
        with pytest.raises(ValueError, match=f"got {head_dim}"):
            gluon_attention_fwd(qkv, cu, heads, head_dim, config=config, out=out)
        assert out.isnan().all()
        return
    gluon_attention_fwd(qkv, cu, heads, head_dim, config=config, out=out)
    want = varlen_attention_reference(qkv, cu, heads, head_dim).float()
    err = ((out[:valid].float() - want[:valid]).norm() / want[:valid].norm()).item()
    assert err < 5e-3, err
    assert not out[:valid].isnan().any()
    assert out[valid:].eq(0).all()
