"""The benchmark image sets of DESIGN.md §5, defined once: name -> list of (h, w) patch grids."""

IMAGE_SETS: dict[str, list[tuple[int, int]]] = {
    "1x224": [(16, 16)],
    "1x448": [(32, 32)],
    "4x448": [(32, 32)] * 4,
    "2x896": [(64, 64)] * 2,
    "mix8": [(16, 16), (32, 32), (24, 40), (40, 24), (32, 48), (16, 32), (64, 64), (28, 36)],
    "16x448": [(32, 32)] * 16,
}


def patches(grids: list[tuple[int, int]]) -> int:
    return sum(h * w for h, w in grids)
