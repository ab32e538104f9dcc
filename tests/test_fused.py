"""`FusedMoonVit` (eager, Triton interpreter) and `MoonVitGraphRunner`'s packing, against the reference."""

import pytest
import torch

from moonvit_fixtures import K3_OPTIONS, random_model, random_pixels, rel_err, tiny_config, tiny_k25_config
from fused_moonvit.moonvit import FusedMoonVit, MoonVitGraphRunner
from fused_moonvit.moonvit.runner import default_budgets, octave_budgets

IMAGE_SETS = [
    [(4, 6)],
    [(2, 2)],
    [(2, 2), (6, 10), (16, 16), (20, 12)],
    [(2, 30), (30, 2)],
    [(16, 16)],  # the tiny table's own size: the identity interpolation
    [(8, 8)] * 5,
]


def fused_pair(seed, **overrides):
    ref = random_model(tiny_config(**overrides), seed=seed)
    fused = FusedMoonVit(ref.config)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.eval()


def test_neither_model_imports_the_other():
    import ast
    import inspect

    from fused_moonvit.moonvit import fused, reference

    for module, other in ((fused, "reference"), (reference, "fused")):
        imported = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").rsplit(".", 1)[-1])
            elif isinstance(node, ast.Import):
                imported.update(alias.name.rsplit(".", 1)[-1] for alias in node.names)
        assert "modules" in imported and other not in imported, (module.__name__, sorted(imported))


def test_same_state_dict_keys():
    cfg = tiny_config()
    from fused_moonvit.moonvit import MoonVitReference

    ours = {k: v.shape for k, v in FusedMoonVit(cfg).state_dict().items()}
    assert ours == {k: v.shape for k, v in MoonVitReference(cfg).state_dict().items()}


@pytest.mark.parametrize("grids", IMAGE_SETS, ids=lambda g: "_".join(f"{h}x{w}" for h, w in g))
def test_fused_eager_matches_reference(grids):
    ref, fused = fused_pair(seed=len(grids))
    pix = random_pixels(grids, seed=sum(h for h, _ in grids))
    g = torch.tensor(grids)
    want, got = ref(pix, g), fused(pix, g)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5


def test_head_dim_72():
    ref, fused = fused_pair(seed=3, num_hidden_layers=1, hidden_size=144, num_attention_heads=2,
                            intermediate_size=64)
    grids = [(6, 10), (2, 4)]
    pix = random_pixels(grids, seed=4)
    assert rel_err(fused(pix, torch.tensor(grids)), ref(pix, torch.tensor(grids))) <= 1e-5


def test_eager_forward_passes_the_longest_image_as_max_seqlen(monkeypatch):
    """The eager forward knows its images: attention gets the longest sequence, not the patch total."""
    import fused_moonvit.moonvit.fused as fused_module

    seen = []
    real = fused_module.packed_attention

    def spy(qkv, cu_seqlens, num_heads, head_dim, max_seqlen, choice):
        seen.append(max_seqlen)
        return real(qkv, cu_seqlens, num_heads, head_dim, max_seqlen, choice)

    monkeypatch.setattr(fused_module, "packed_attention", spy)
    ref, fused = fused_pair(seed=13)
    grids = [(4, 6), (10, 2), (2, 2)]
    fused(random_pixels(grids, seed=14), torch.tensor(grids))
    assert seen == [24] * ref.config.num_hidden_layers


def test_flash_attention_backend_on_the_cpu(monkeypatch):
    """"fa2" forced by the argument or the environment runs the other backend (per-sequence SDPA on a CPU)
    and gives the same result; an unknown name fails at construction, before any forward or capture."""
    from fused_moonvit.moonvit.attention import ATTENTION_ENV, choose_attention

    ref, fused = fused_pair(seed=15)
    grids = [(4, 6), (10, 2)]
    pix = random_pixels(grids, seed=16)
    want = ref(pix, torch.tensor(grids))
    for backend, env in (("fa2", None), (None, "fa2")):
        if env:
            monkeypatch.setenv(ATTENTION_ENV, env)
        model = FusedMoonVit(ref.config, attention_backend=backend)
        model.load_state_dict(ref.state_dict())
        assert choose_attention(64, "cpu", 72, model.attention_backend).backend == "fa2"
        assert rel_err(model.eval()(pix, torch.tensor(grids)), want) <= 1e-5
    monkeypatch.setenv(ATTENTION_ENV, "flash3")
    with pytest.raises(ValueError, match="FUSED_MOONVIT_ATTENTION must be one of triton, gluon, fa3, fa2, got 'flash3'"):
        FusedMoonVit(ref.config)
    with pytest.raises(ValueError, match="FUSED_MOONVIT_ATTENTION must be one of triton, gluon, fa3, fa2, got 'flash3'"):
        MoonVitGraphRunner(fused, budgets=[64])
    monkeypatch.delenv(ATTENTION_ENV)
    with pytest.raises(ValueError, match="backend must be one of triton, gluon, fa3, fa2, got 'flash'"):
        FusedMoonVit(ref.config, attention_backend="flash")


def test_importing_the_reference_leaves_triton_alone():
    """The reference path (and the limits it checks) must not import Triton: a CPU user may set
    TRITON_INTERPRET only later, and Triton decides when a kernel module is first imported."""
    import subprocess
    import sys

    from forked_cases import HANG_GUARD_S

    code = ("import sys, fused_moonvit.moonvit as m, fused_moonvit.kernels as k; m.MoonVitReference; "
            "k.MAX_GRID_SIDE; print('triton' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            timeout=HANG_GUARD_S)
    assert result.stdout.strip() == "False"


def test_tower_only():
    ref, fused = fused_pair(seed=5, text_hidden_size=None)
    grids = [(4, 4), (2, 6)]
    pix = random_pixels(grids, seed=6)
    got = fused(pix, torch.tensor(grids))
    assert got.shape == (7, 4 * 32)
    assert rel_err(got, ref(pix, torch.tensor(grids))) <= 1e-5


@pytest.mark.parametrize("grids", IMAGE_SETS, ids=lambda g: "_".join(f"{h}x{w}" for h, w in g))
def test_runner_padding_is_poisoned_and_harmless(grids):
    """Padding rows of the pixel buffer hold NaN; valid outputs match the reference and are bitwise those
    of zero padding."""
    ref, fused = fused_pair(seed=7)
    budget = -(-sum(h * w for h, w in grids) // 64) * 64 + 64
    runner = MoonVitGraphRunner(fused, budgets=[budget], max_items=len(grids) + 2)
    pix = random_pixels(grids, seed=8)
    clean = runner.encode(pix, torch.tensor(grids))  # zero padding rows
    runner.pixels.fill_(float("nan"))
    outs = runner.encode(pix, torch.tensor(grids))
    want = ref(pix, torch.tensor(grids)).split([h * w // 4 for h, w in grids])
    assert [o.shape for o in outs] == [w.shape for w in want]
    for o, w in zip(outs, want):
        assert torch.isfinite(o).all() and rel_err(o, w) <= 1e-5
    assert all(torch.equal(o, c) for o, c in zip(outs, clean)), "NaN padding rows reached a valid output"


def test_split_equals_one_call():
    ref, fused = fused_pair(seed=9)
    grids = [(6, 10), (16, 16), (2, 2), (4, 8), (10, 10), (8, 8), (2, 4)]
    pix = random_pixels(grids, seed=10)
    big = MoonVitGraphRunner(fused, budgets=[1024], max_items=8).encode(pix, torch.tensor(grids))
    small = MoonVitGraphRunner(fused, budgets=[64, 128, 192], max_items=2)
    chunks = small.plan_chunks([list(g) for g in grids])
    # 256 patches exceed the largest budget (eager); the rest pack in order, two images at most
    assert chunks == [(0, 1, 64), (1, 2, None), (2, 4, 64), (4, 6, 192), (6, 7, 64)]
    split = small.encode(pix, torch.tensor(grids))
    want = ref(pix, torch.tensor(grids)).split([h * w // 4 for h, w in grids])
    for a, b, w in zip(big, split, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert rel_err(a, w) <= 1e-5


def test_concurrent_threads_get_their_own_images():
    """All budgets share one pixel and one plan buffer: calls from several threads must take turns."""
    import threading

    ref, fused = fused_pair(seed=12)
    runner = MoonVitGraphRunner(fused, budgets=[128, 256], max_items=4)
    sets = [[(8, 8), (4, 6)], [(16, 16)], [(2, 2), (6, 2), (4, 4)], [(10, 10)]]
    pixels = [random_pixels(g, seed=20 + i) for i, g in enumerate(sets)]
    wants = [ref(p, torch.tensor(g)) for p, g in zip(pixels, sets)]
    results, start = {}, threading.Barrier(len(sets))

    def call(i):
        start.wait()
        results[i] = [torch.cat(runner.encode(pixels[i], torch.tensor(sets[i]))) for _ in range(2)]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(wants):
        for got in results[i]:
            assert rel_err(got, want) <= 1e-5, f"thread {i} got another call's result"


def test_default_budgets():
    """The default ladder is the 8-step octave ladder: every power of two (448 and 896 px images and 16 x 448
    px fit exactly), 10% padding at most above 4096 patches."""
    ladder = default_budgets()
    assert ladder == octave_budgets(8) and len(ladder) == 48
    assert ladder[0] == 64 and ladder[-1] == 16384 and all(64 << k in ladder for k in range(9))
    assert all(hi <= 1.1 * lo for lo, hi in zip(ladder, ladder[1:]) if lo >= 4096)
    assert default_budgets(max_budget=4096, min_budget=128) == octave_budgets(8, 4096, 128)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_octave_budgets(steps):
    ladder = octave_budgets(steps)
    assert ladder == sorted(set(ladder)) and ladder[0] == 64 and ladder[-1] == 16384
    assert all(64 << k in ladder for k in range(9))  # 448 px, 896 px, 16 x 448 px fit exactly
    assert all(b % 64 == 0 for b in ladder)
    for k in range(8):  # at most `steps` budgets per octave, each step at most 2^(1/steps) before rounding
        octave = [b for b in ladder if 64 << k <= b <= 128 << k]
        assert len(octave) <= steps + 1
        assert all(hi <= lo * 2 ** (1 / steps) + 64 for lo, hi in zip(octave, octave[1:]))
    if steps == 8:  # as dense as vLLM 0.34's default grid above 4096 patches
        assert all(hi <= 1.1 * lo for lo, hi in zip(ladder, ladder[1:]) if lo >= 4096)
    assert octave_budgets(1) == [64 << k for k in range(9)]
    assert octave_budgets(4, max_budget=3000, min_budget=100) == [100, 128, 192, 200, 256, 320, 384, 400, 512,
                                                                    576, 704, 800, 960, 1152, 1408, 1600, 1920,
                                                                    2304, 2752, 3000]
    with pytest.raises(ValueError, match="steps_per_octave must be >= 1, got 0"):
        octave_budgets(0)
    with pytest.raises(ValueError, match="max_budget 64 is below min_budget 128"):
        octave_budgets(4, max_budget=64, min_budget=128)


def test_bad_inputs():
    _, fused = fused_pair(seed=11, num_hidden_layers=1)
    with pytest.raises(ValueError, match="not a multiple of the merge size"):
        fused(torch.randn(12, 3, 14, 14), torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match="needs 16"):
        fused(torch.randn(15, 3, 14, 14), torch.tensor([[4, 4]]))
    with pytest.raises(ValueError, match=r"each budget must be a multiple of 4 patches \(the 2x2 merge\), got 66"):
        MoonVitGraphRunner(fused, budgets=[128, 66])
    with pytest.raises(TypeError, match=r"each budget must be an int, got float 64.5"):
        MoonVitGraphRunner(fused, budgets=[64.5])
    with pytest.raises(ValueError, match="budgets must name at least one patch budget"):
        MoonVitGraphRunner(fused, budgets=[])
    with pytest.raises(TypeError, match=r"max_items must be an int, got float 2.5"):
        MoonVitGraphRunner(fused, budgets=[64], max_items=2.5)
    with pytest.raises(ValueError, match=r"max_items must be >= 1, got 0"):
        MoonVitGraphRunner(fused, budgets=[64], max_items=0)
    with pytest.raises(RuntimeError, match="CUDA"):
        MoonVitGraphRunner(fused, budgets=[64]).capture()
    runner = MoonVitGraphRunner(fused, budgets=[64, 128], max_items=2)
    with pytest.raises(ValueError, match=r"pixel_values' row count B must be a multiple of 4 patches \(the 2x2 merge\), got 62"):
        fused.forward_static(torch.randn(62, 3, 14, 14), runner.device_plan)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 14, 14\), got \(64, 3, 14, 13\)"):
        fused.forward_static(torch.randn(64, 3, 14, 13), runner.device_plan)
    with pytest.raises(ValueError, match="pixel_values must be torch.float32"):
        fused.forward_static(torch.randn(64, 3, 14, 14, dtype=torch.float64), runner.device_plan)


def test_plan_budget_must_match_the_buffer():
    from fused_moonvit.kernels import build_plan, new_device_plan, upload_plan

    with pytest.raises(ValueError, match="built for a budget of 128 patches, but the buffer has 64"):
        upload_plan(build_plan([(8, 8)], 128, 2), new_device_plan(2, "cpu"), budget=64)


def test_default_budgets_reject_bad_bounds():
    with pytest.raises(ValueError, match=r"min_budget must be a multiple of 4 patches \(the 2x2 merge\), got 6"):
        default_budgets(min_budget=6)
    with pytest.raises(TypeError, match="max_budget must be an int, got float 4096.0"):
        default_budgets(max_budget=4096.0)
    with pytest.raises(ValueError, match="max_budget 64 is below min_budget 128"):
        default_budgets(max_budget=64, min_budget=128)


ITEM_SETS = [
    [(4, 6, 8)],
    [(1, 4, 6), (3, 2, 4), (1, 2, 2), (4, 6, 2), (2, 8, 10)],
    [(1, 16, 16), (2, 16, 16)],  # the tiny table's own size, as an image and as a chunk
]


def fused_3d_pair(seed, **overrides):
    ref = random_model(tiny_k25_config(**overrides), seed=seed)
    fused = FusedMoonVit(ref.config)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.eval()


@pytest.mark.parametrize("tower", ["k25", "k3"])
@pytest.mark.parametrize("items", ITEM_SETS, ids=lambda g: "_".join("x".join(map(str, i)) for i in g))
def test_moonvit3d_eager_matches_reference(tower, items):
    ref, fused = fused_3d_pair(seed=len(items), **(K3_OPTIONS if tower == "k3" else {}))
    pix = random_pixels(items, seed=sum(t for t, _, _ in items))
    g = torch.tensor(items)
    want, got = ref(pix, g), fused(pix, g)
    assert got.shape == want.shape == (sum(h * w // 4 for _, h, w in items), 24)
    assert rel_err(got, want) <= 1e-5


def test_moonvit3d_head_dim_128():
    """Kimi-K3's head dim (a 256-wide qkv over 2 heads): the attention kernel's head without a tail."""
    ref, fused = fused_3d_pair(seed=5, num_hidden_layers=1, num_attention_heads=2, **{**K3_OPTIONS, "qkv_hidden_size": 256})
    assert fused.config.head_dim == 128
    items = [(2, 6, 10), (1, 2, 4)]
    pix = random_pixels(items, seed=6)
    assert rel_err(fused(pix, torch.tensor(items)), ref(pix, torch.tensor(items))) <= 1e-5


@pytest.mark.parametrize("tower", ["k25", "k3"])
def test_moonvit3d_runner_padding_is_poisoned_and_harmless(tower):
    """Video chunks and images through the runner's static buffers, padding rows NaN: valid outputs match
    the reference, chunks split across calls as budgets allow, and are bitwise those of zero padding."""
    ref, fused = fused_3d_pair(seed=13, **(K3_OPTIONS if tower == "k3" else {}))
    items = [(4, 8, 8), (1, 6, 4), (2, 4, 4), (3, 2, 2), (1, 10, 10)]
    runner = MoonVitGraphRunner(fused, budgets=[128, 320], max_items=3)
    assert runner.plan_chunks(items) == [(0, 3, 320), (3, 5, 128)]  # 312 patches, then 112
    pix = random_pixels(items, seed=14)
    clean = runner.encode(pix, torch.tensor(items))  # zero padding rows
    runner.pixels.fill_(float("nan"))
    outs = runner.encode(pix, torch.tensor(items))
    want = ref(pix, torch.tensor(items)).split([h * w // 4 for _, h, w in items])
    assert [o.shape for o in outs] == [w.shape for w in want]
    for o, w in zip(outs, want):
        assert torch.isfinite(o).all() and rel_err(o, w) <= 1e-5
    assert all(torch.equal(o, c) for o, c in zip(outs, clean)), "NaN padding rows reached a valid output"


def test_moonvit3d_nan_stays_in_its_item():
    """A NaN pixel in frame 2 of a chunk makes that chunk's outputs NaN (its frames are averaged and it
    attends across them) and leaves the other items finite."""
    ref, fused = fused_3d_pair(seed=15)
    items = [(1, 4, 4), (3, 4, 4), (1, 2, 2)]
    pix = random_pixels(items, seed=16)
    pix[16 + 2 * 16 + 5, 1, 3, 3] = float("nan")
    out = fused(pix, torch.tensor(items)).split([4, 4, 1])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    assert out[1].isnan().all()


def leaky_attention(real):
    """The packed attention as FlashAttention-3 reads keys and values: also the first row of the next
    sequence, times P = 0, so a NaN or Inf there turns the sequence before it NaN (docs/design.md 3.6)."""
    def attend(qkv, cu_seqlens, num_heads, head_dim, max_seqlen, choice):
        out = real(qkv, cu_seqlens, num_heads, head_dim, max_seqlen, choice)
        v = qkv[:, 2 * num_heads * head_dim:]
        bounds = cu_seqlens.tolist()
        for start, end, after in zip(bounds[:-2], bounds[1:-1], bounds[2:]):
            if start < end < after:
                out[start:end] += 0 * v[end]
        return out
    return attend


@pytest.mark.parametrize("guarded", [True, False])
def test_nan_item_kept_from_a_backend_that_reads_across_items(guarded, monkeypatch):
    """Through a backend that reads the next item's first value row (FA3 does), a NaN pixel in the middle
    item turns the item before it NaN, unless the encoder keeps non-finite items from it: then the middle
    item (and only it) comes out NaN and its neighbours exactly as with a finite middle item."""
    import fused_moonvit.moonvit.attention as attention
    import fused_moonvit.moonvit.fused as fused_module

    _, fused = fused_pair(seed=17, num_hidden_layers=2)
    fused.attention_backend = "fa2"
    monkeypatch.setattr(fused_module, "packed_attention", leaky_attention(attention.packed_attention))
    monkeypatch.setattr(fused_module, "LEAKY_BACKENDS", frozenset({"fa2"} if guarded else ()))
    grids = [(4, 6), (6, 4), (2, 2)]
    pix = random_pixels(grids, seed=18)
    clean = fused(pix, torch.tensor(grids)).split([6, 6, 1])
    pix[24, 0, 0, 0] = float("nan")  # the middle item's first row: the one the leak reads
    pix[30, 2, 5, 7] = float("inf")
    out = fused(pix, torch.tensor(grids)).split([6, 6, 1])
    assert out[1].isnan().all()
    assert torch.equal(out[2], clean[2])
    if guarded:
        assert torch.equal(out[0], clean[0])
    else:
        assert out[0].isnan().all(), "the stand-in for FA3 must leak, or this test shows nothing"


def test_nonfinite_item_rows():
    """Rows of the items that hold a NaN or Inf pixel anywhere, padding never, against a loop per item."""
    from fused_moonvit.kernels.plan import build_plan, expand_plan, new_device_plan, new_token_meta, upload_plan
    from fused_moonvit.moonvit.fused import nonfinite_item_rows

    grids, budget, slots = [(2, 4), (4, 4), (2, 2), (2, 6)], 64, 6
    meta = expand_plan(upload_plan(build_plan(grids, budget, slots), new_device_plan(slots, "cpu"), budget=budget),
                       new_token_meta(budget, "cpu"))
    pix = torch.randn(budget, 3, 14, 14, generator=torch.Generator().manual_seed(19))
    pix[9, 1, 2, 3] = float("nan")  # item 1
    pix[36, 0, 0, 0] = float("-inf")  # item 3
    pix[50:] = float("nan")  # padding
    got = nonfinite_item_rows(pix, meta, slots)
    want = torch.zeros(budget, dtype=torch.bool)
    want[8:24] = True
    want[28:40] = True
    assert torch.equal(got, want)


def test_runner_validates_the_items_once(monkeypatch):
    """`encode` builds the call's Items once; its chunks, graphed or eager (an item past the largest
    budget), reach the plan and the eager forward as Items, not checked again."""
    import fused_moonvit.kernels.items as items_module

    _, fused = fused_pair(seed=12, num_hidden_layers=1)
    runner = MoonVitGraphRunner(fused, budgets=[64], max_items=2)
    grid = [(2, 2), (8, 10), (4, 4), (2, 6), (6, 6)]  # the 80-patch item runs eagerly
    pix = random_pixels(grid, seed=3)
    read = []
    real = items_module.grid_thw_list
    monkeypatch.setattr(items_module, "grid_thw_list", lambda g: read.append(g) or real(g))
    outs = runner.encode(pix, torch.tensor(grid))
    assert len(read) == 1 and [o.shape[0] for o in outs] == [h * w // 4 for h, w in grid]
