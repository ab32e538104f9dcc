"""The benchmark image sets (docs/design.md section 4.2), defined once: name -> list of (h, w) patch grids, and the
padded cases a server meets: name -> (grids, budget in patches), the budget larger than the images; and, for
MoonViT3d (Kimi-K2.5 / K2.6 / K3), the video sets: name -> list of (t, h, w) items."""

import math

IMAGE_SETS: dict[str, list[tuple[int, int]]] = {
    "1x224": [(16, 16)],
    "1x448": [(32, 32)],
    "4x448": [(32, 32)] * 4,
    "1x896": [(64, 64)],
    "2x896": [(64, 64)] * 2,
    "mix8": [(16, 16), (32, 32), (24, 40), (40, 24), (32, 48), (16, 32), (64, 64), (28, 36)],
    "16x448": [(32, 32)] * 16,
}

PADDED_SETS: dict[str, tuple[list[tuple[int, int]], int]] = {
    "1x896-in-8192": ([(64, 64)], 8192),
    "1x448-in-2048": ([(32, 32)], 2048),
    "mix8-in-11264": (IMAGE_SETS["mix8"], 11264),  # 2816 tokens: vLLM 0.34.0's default budget grid
    "mix8-in-16384": (IMAGE_SETS["mix8"], 16384),  # 4096 tokens: vLLM 0.33.0's power-of-two ladder
}

# Each padded case's images in an exact budget, for comparisons.
PADDED_EXACT = {"1x896-in-8192": "1x896", "1x448-in-2048": "1x448", "mix8-in-11264": "mix8", "mix8-in-16384": "mix8"}


# Kimi-K2.5's processor cuts video into 4-frame chunks (t = 4); a 448 px frame is 32 x 32 patches.
VIDEO_SETS: dict[str, list[tuple[int, int, int]]] = {
    "4chunks-448": [(4, 32, 32)] * 4,  # 16 frames, 8 s at the processor's 2 fps
    "mix-img-video": [(1, 32, 32), (4, 32, 32), (1, 16, 16), (4, 24, 40), (1, 64, 64), (2, 32, 32)],
}


BUDGET_ROUNDING = 64  # an exact set's graph budget: its patch count rounded up to this


def patches(grids) -> int:
    """Patches of (h, w) images or (t, h, w) items."""
    return sum(math.prod(g) for g in grids)


def round_budget(n: int) -> int:
    return -(-n // BUDGET_ROUNDING) * BUDGET_ROUNDING


def budgeted_sets(exact: dict, padded: dict) -> dict[str, tuple[list[tuple[int, int]], int]]:
    """name -> (grids, budget): the exact sets at their patch count rounded up, then the padded cases."""
    sets = {n: (list(g), round_budget(patches(g))) for n, g in exact.items()}
    sets.update({n: (list(g), b) for n, (g, b) in padded.items()})
    return sets


# What Kimi-K2.5 / K2.6 users send, at their processors' defaults: a photo resized to at most
# max_patches=16384 (512 per side), and video frames of at most 4096 patches in chunks of 4 frames that
# attend jointly (one 16384-patch sequence each).
USER_IMAGE_SETS: dict[str, list[tuple[int, int]]] = {
    "photo16k": [(128, 128)],
    "2photos8k": [(64, 128)] * 2,
}
USER_VIDEO_SETS: dict[str, list[tuple[int, int, int]]] = {
    "chunk16k": [(4, 64, 64)],
    "2chunks16k": [(4, 64, 64)] * 2,
}


def measured_sets(video: bool) -> dict[str, tuple[list, int]]:
    """name -> (items, budget) of every benchmark set: the image sets and the sizes users send (with
    `video`, for MoonViT3d, the video sets too) at their patch count rounded up, then the padded cases."""
    exact = {**IMAGE_SETS, **USER_IMAGE_SETS}
    if video:
        exact.update({**VIDEO_SETS, **USER_VIDEO_SETS})
    return budgeted_sets(exact, PADDED_SETS)
