"""`Items`: the validated items of one encoder call, built once where input enters and trusted below.

An item is an image, (t = 1, h, w) patches, or a MoonViT3d video chunk of t frames of h x w patches. The
boundaries (the models' `forward`, the graph runner's `encode`, the vLLM protocol's replay values, the
CLI) build an `Items` from the user's grid with every check and a message naming the bad value; the
layers below (`build_plan`, the runner's chunking, the reference forward) take it as it is.

Like `limits`, this module imports no Triton, so the eager path can use it without deciding between the
Triton interpreter and the GPU compiler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .limits import MAX_GRID_SIDE, MERGE_PATCHES, MERGE_SIDE


def grid_thw_list(grid: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    """Items' grids as [t, h, w] lists: (n, 3) (t, h, w) rows as they are, (n, 2) (h, w) rows as images
    (t = 1). Integers on the host; other shapes and dtypes fail naming the value. Checks the layout only:
    `Items.of` checks the values."""
    if isinstance(grid, Items):
        return [list(row) for row in grid]
    if not isinstance(grid, torch.Tensor):
        grid = torch.as_tensor(grid) if len(grid) else torch.zeros(0, 3, dtype=torch.int64)
    if grid.is_floating_point() or grid.is_complex() or grid.dtype == torch.bool:
        raise TypeError(f"the grid must hold integers (an integer dtype), got dtype {grid.dtype}")
    if grid.device.type != "cpu":
        # Reading it would sync with the device; the caller has the grids on the host anyway.
        raise ValueError(f"the grid must be a CPU tensor, got device {grid.device}")
    if grid.dim() != 2 or grid.shape[1] not in (2, 3):
        raise ValueError(f"the grid must have shape (n, 2) of (h, w) or (n, 3) of (t, h, w), got {tuple(grid.shape)}")
    rows = grid.tolist()
    return [[1, *r] for r in rows] if grid.shape[1] == 2 else rows


class Items:
    """Immutable, validated (t, h, w) rows of one call's items, with what every layer derives from them.

    rows: ((t, h, w), ...) in patches.
    offsets: each item's first patch row in the packed pixels, then the total (n + 1 entries).
    tokens: each item's merged output tokens, h/2 * w/2 (a chunk's frames are averaged before the merge).
    patches, outputs: the totals of t*h*w and of `tokens`.

    Build it with `Items.of`; slicing and `pick` give the Items of some of its items, without checking
    them again.
    """

    __slots__ = ("rows", "offsets", "tokens", "patches", "outputs")

    def __init__(self, rows: tuple[tuple[int, int, int], ...]):
        # Trusts `rows`: only `of`, slicing and `pick` call this, on rows already checked.
        offsets, tokens = [0], []
        for t, h, w in rows:
            offsets.append(offsets[-1] + t * h * w)
            tokens.append(h * w // MERGE_PATCHES)
        for name, value in (("rows", rows), ("offsets", tuple(offsets)), ("tokens", tuple(tokens)),
                            ("patches", offsets[-1]), ("outputs", sum(tokens))):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("Items is immutable")

    @classmethod
    def of(cls, grid: Items | torch.Tensor | Sequence[Sequence[int]], max_frames: int | None = None) -> Items:
        """The items of `grid`: (n, 2) image (h, w) rows or (n, 3) (t, h, w) rows, a host integer tensor
        or nested lists, or an `Items` (returned as it is). Each side is even (the 2x2 merge) and in
        1..MAX_GRID_SIDE (the RoPE table); t is at least 1 and, given `max_frames` (the tower's time
        embedding), at most that. Raises naming the bad item and value."""
        if isinstance(grid, Items):
            if max_frames is not None and grid.frames > max_frames:
                i = next(i for i, (t, _, _) in enumerate(grid) if t > max_frames)
                raise ValueError(_too_many_frames(i, grid.rows[i], max_frames))
            return grid
        rows = grid_thw_list(grid)
        for i, (t, h, w) in enumerate(rows):
            if t < 1:
                raise ValueError(f"item {i}: t must be at least 1 frame, got {t}")
            if max_frames is not None and t > max_frames:
                raise ValueError(_too_many_frames(i, (t, h, w), max_frames))
            for name, side in (("h", h), ("w", w)):
                if not 1 <= side <= MAX_GRID_SIDE:
                    raise ValueError(f"item {i}: {name} must be in 1..{MAX_GRID_SIDE} patches, got {side} "
                                     f"(grid {t}x{h}x{w} is outside 1..{MAX_GRID_SIDE} per side)")
                if side % MERGE_SIDE:
                    raise ValueError(f"item {i}: {name} must be even, got {side}: not a multiple of the merge "
                                     f"size {MERGE_SIDE} (grid {t}x{h}x{w})")
        return cls(tuple(tuple(row) for row in rows))

    @property
    def frames(self) -> int:
        """The most frames of any item (0 for no items)."""
        return max((t for t, _, _ in self.rows), default=0)

    @property
    def longest(self) -> int:
        """The most patches of any item (0 for no items): the longest attention sequence."""
        return max((t * h * w for t, h, w in self.rows), default=0)

    def check_rows(self, rows: int) -> None:
        """Raises unless the packed pixels have exactly this call's patch rows."""
        if rows != self.patches:
            raise ValueError(f"pixel_values has {rows} patches but the grid {[list(r) for r in self.rows]} "
                             f"needs {self.patches}")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self.rows)

    def __getitem__(self, index: slice) -> Items:
        if not isinstance(index, slice):
            raise TypeError(f"Items take slices only (item i is .rows[i]), got {type(index).__name__}")
        return Items(self.rows[index])

    def pick(self, indices: Sequence[int]) -> Items:
        """The Items of items `indices`, in that order (a data-parallel rank's share), without checking
        them again."""
        return Items(tuple(self.rows[i] for i in indices))

    def __repr__(self) -> str:
        return f"Items({[list(r) for r in self.rows]})"


def _too_many_frames(i: int, row: tuple[int, int, int], max_frames: int) -> str:
    t, h, w = row
    why = ("this tower takes images only (t = 1)" if max_frames == 1
           else f"the tower's time embedding has {max_frames}")
    return f"item {i} ({t}x{h}x{w}) has {t} frames, but {why}"
