"""Every attention backend the encoder can choose, through the one call the forward makes
(`packed_attention`), held to the same checks as the Triton kernel: the plan's cu_seqlens with zero-length
slots and a trailing padding sequence whose qkv rows are NaN, padding rows out as zeros, NaN confined to
its own sequence, and (on a GPU) a captured graph replayed under a new plan. A backend that cannot run
here (vLLM's FA3 off Hopper, or without its library) must be refused by name instead."""

import pytest
import torch
from kernel_cases import CASES, REAL_SIZE, check_attention_output, generator, needs_gpu, randn

from fused_moonvit.kernels import build_plan, new_device_plan, plan_cu_seqlens, upload_plan
from fused_moonvit.moonvit.attention import (BACKENDS, FA3_LIB_ENV, backend_available, choose_attention,
                                             packed_attention)

backend_params = pytest.mark.parametrize("backend", BACKENDS)
# Half precision for the libraries (FlashAttention takes nothing else); fp32 on a CPU, where the
# "fa2" backend is SDPA per sequence and the Triton kernel is interpreted.
SMALL = {k: CASES[k] for k in ("many", "padding", "max_slots", "all_padding", "video_mix")}


def dtype_for(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def attend(qkv, cu, heads, head_dim, backend, max_seqlen=None):
    choice = choose_attention(qkv.shape[0], qkv.device, head_dim, backend)
    assert choice.backend == backend
    return packed_attention(qkv, cu, heads, head_dim, max_seqlen or qkv.shape[0], choice)


def refused(backend, device, head_dim=72) -> bool:
    """True (after checking the refusal names the backend) where `backend` cannot run here."""
    if backend_available(backend, device):
        return False
    with pytest.raises(RuntimeError, match=f"attention backend '{backend}' cannot run on"):
        choose_attention(64, device, head_dim, backend)
    return True


@backend_params
@pytest.mark.parametrize("case", list(SMALL.values()), ids=list(SMALL))
@pytest.mark.parametrize("heads,head_dim", [(2, 72), (1, 128)], ids=["d72", "d128"])
def test_plans(backend, case, heads, head_dim, device):
    if refused(backend, device):
        return
    plan = build_plan(list(case.grids), case.budget, case.max_items)
    cu = plan_cu_seqlens(plan).to(device)
    qkv = randn((case.budget, 3 * heads * head_dim), generator(case, backend, head_dim), dtype_for(device), device)
    qkv[case.total:] = float("nan")
    check_attention_output(attend(qkv, cu, heads, head_dim, backend), qkv, cu, heads, head_dim)


@backend_params
@pytest.mark.parametrize("part", ["key", "value"])
def test_nan_stays_in_its_sequence(backend, part, device):
    """A NaN key or value poisons its own sequence's rows of its head, and nothing after it. The sequence
    before it stays exact, except that FA3 may turn its rows of that head NaN (never a wrong number): FA3
    loads a sequence's last key tile whole, which may reach into the next sequence, masks the scores and
    multiplies the masked values by P = 0, and 0 * NaN is NaN."""
    if refused(backend, device):
        return
    heads, head_dim = 2, 72
    cu = torch.tensor([0, 6, 16, 16, 20, 24], dtype=torch.int32, device=device)  # an empty slot, then padding
    qkv = randn((24, 3 * heads * head_dim), generator(backend, part), dtype_for(device), device)
    exact = attend(qkv.clone(), cu, heads, head_dim, backend).view(24, heads, head_dim)
    qkv[20:] = float("nan")
    qkv[8, (1 if part == "key" else 2) * heads * head_dim + 3] = float("nan")  # the second sequence, head 0
    out = attend(qkv, cu, heads, head_dim, backend).view(24, heads, head_dim)
    # A NaN key spoils every output column of its head; a NaN value only its own column.
    poisoned = torch.zeros(heads, head_dim, dtype=torch.bool, device=device)
    poisoned[0, slice(None) if part == "key" else slice(3, 4)] = True
    assert torch.equal(out[6:16].isnan(), poisoned.expand(10, -1, -1)), "the NaN must poison exactly its own"
    assert torch.equal(out[6:16][~poisoned.expand(10, -1, -1)], exact[6:16][~poisoned.expand(10, -1, -1)])
    assert torch.equal(out[16:20], exact[16:20])
    assert out[20:].eq(0).all()
    if backend == "fa3" and out[:6].isnan().any():
        assert torch.equal(out[:6].isnan(), poisoned.expand(6, -1, -1))
        assert torch.equal(out[:6][~poisoned.expand(6, -1, -1)], exact[:6][~poisoned.expand(6, -1, -1)])
    else:
        assert torch.equal(out[:6], exact[:6])


@pytest.mark.gpu
@needs_gpu
@backend_params
@pytest.mark.parametrize("heads,head_dim", [(16, 72), (12, 128)], ids=["d72", "d128"])
def test_graph_replay_under_new_plans(backend, heads, head_dim, device):
    """Captured once with an all-padding plan, as the runner does, then replayed with two real plans
    uploaded into the same buffer: the output follows each plan, and nothing is read back on the host."""
    if refused(backend, device, head_dim):
        return
    from fused_moonvit.moonvit.runner import capture_graph

    budget, slots = REAL_SIZE.budget, REAL_SIZE.max_items
    device_plan = new_device_plan(slots, device)
    upload_plan(build_plan([], budget, slots), device_plan, budget=budget)
    cu = plan_cu_seqlens(device_plan)
    qkv = torch.empty(budget, 3 * heads * head_dim, dtype=torch.bfloat16, device=device)
    choice = choose_attention(budget, device, head_dim, backend)
    graph, out, _ = capture_graph(lambda: packed_attention(qkv, cu, heads, head_dim, budget, choice), device=device)
    for grids in (list(REAL_SIZE.grids), [(1, 64, 64), (1, 2, 2), (4, 32, 32)]):
        plan = build_plan(grids, budget, slots)
        upload_plan(plan, device_plan, budget=budget)
        total = int(plan_cu_seqlens(plan)[-2])
        qkv.copy_(randn(qkv.shape, generator(backend, head_dim, len(grids)), torch.bfloat16, device))
        qkv[total:] = float("nan")
        graph.replay()
        check_attention_output(out, qkv, plan_cu_seqlens(plan).to(device), heads, head_dim)


def test_choice_follows_the_table(monkeypatch, tmp_path, device):
    """The first available backend of the row holding the budget, per device class and head dim; the
    Triton tiles from the row; a forced backend wins; a forced backend that cannot run is refused."""
    import fused_moonvit.moonvit.attention as attention

    cls = attention.device_class(device)
    table = {"measured": {}, "rows": [
        {"device_class": cls, "head_dim": 72, "max_budget": 2048,
         "ranking": [{"backend": "triton", "config": [32, 64, 4, 2]}, {"backend": "fa2"}]},
        {"device_class": cls, "head_dim": 72, "max_budget": 16384,
         "ranking": [{"backend": "fa3"}, {"backend": "fa2"}, {"backend": "triton", "config": [128, 64, 8, 2]}]},
        {"device_class": cls, "head_dim": 128, "max_budget": 16384, "ranking": [{"backend": "fa3"}]},
    ]}
    path = tmp_path / "table.json"
    path.write_text(__import__("json").dumps(table))
    monkeypatch.setattr(attention, "TABLE_PATH", path)
    attention.attention_table.cache_clear()
    try:
        small = choose_attention(2048, device, 72)
        assert small.backend == "triton"
        if device.type == "cuda":
            assert (small.config.block_m, small.config.block_n, small.config.num_warps) == (32, 64, 4)
        large = choose_attention(2052, device, 72)
        assert large.backend == ("fa3" if backend_available("fa3", device) else "fa2")
        assert choose_attention(10**6, device, 72) == large  # above the last row: the last row
        assert choose_attention(4096, device, 72, "triton").backend == "triton"
        # No Triton entry and FA3 unavailable: the Triton kernel all the same, never no kernel.
        assert choose_attention(4096, device, 128).backend == ("fa3" if backend_available("fa3", device)
                                                               else "triton")
        assert choose_attention(4096, device, 64).backend in ("fa3", "triton")  # no row: FA3 where it runs
        monkeypatch.setenv("FUSED_MOONVIT_ATTENTION", "fa2")
        assert choose_attention(512, device, 72).backend == "fa2"
    finally:
        attention.attention_table.cache_clear()


def test_fa3_library_env_must_name_a_file(monkeypatch, tmp_path):
    import fused_moonvit.moonvit.attention as attention

    monkeypatch.setenv(FA3_LIB_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match=f"{FA3_LIB_ENV}=.*missing.so' is not a file"):
        attention.fa3_library_path()


def test_forcing_fa3_off_hopper_says_why():
    with pytest.raises(RuntimeError, match=r"attention backend 'fa3' cannot run on cpu here: FA3 runs on Hopper "
                                           r"\(sm90\) only, this is cpu"):
        choose_attention(1024, "cpu", 72, "fa3")


def test_committed_table_is_well_formed():
    """Every row names known backends, in budget order per (device class, head dim), with Triton tiles
    that `AttentionConfig` accepts."""
    from fused_moonvit.kernels.attention import AttentionConfig
    from fused_moonvit.moonvit.attention import attention_table

    rows = attention_table()["rows"]
    seen = {}
    for row in rows:
        key = (row["device_class"], row["head_dim"])
        assert row["max_budget"] > seen.get(key, 0), f"rows of {key} out of budget order"
        seen[key] = row["max_budget"]
        assert row["ranking"], f"row {key} {row['max_budget']} ranks nothing"
        for entry in row["ranking"]:
            assert entry["backend"] in BACKENDS
            if entry["backend"] == "triton":
                AttentionConfig(*entry["config"])
