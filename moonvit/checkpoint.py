"""Loading MoonVit weights from a local Hugging Face model directory.

A Kimi-VL checkpoint is mostly language model (over 30 GB; Kimi-K2.5's is over 500 GB), so only the
encoder's tensors are read, memory-mapped through safetensors, and only the shards that hold them are
opened. Both `model.safetensors` and sharded checkpoints (`model.safetensors.index.json`) are accepted,
and so is a standalone MoonViT directory whose keys lack the `vision_tower.` prefix.

The encoder's tensors are `vision_tower.*` plus the projector, whose prefix is the config's
`projector_name`: `multi_modal_projector.*` in Kimi-VL, `mm_projector.*` in Kimi-K2.5 / K2.6 / K3.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .families import FAMILIES, titles

TOWER_PREFIX = "vision_tower."
# Every projector prefix a checkpoint may hold: the families' (MoonVitConfig.projector_name values).
PROJECTOR_PREFIXES = tuple(dict.fromkeys(f"{family.projector_name}." for family in FAMILIES.values()))
ENCODER_PREFIXES = (TOWER_PREFIX, *PROJECTOR_PREFIXES)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: every missing, unexpected or misshaped key at once.

    `problems` maps each kind of problem ("missing", "unexpected", ...) to its keys; the message lists
    them all, one per line, after `summary`. Errors about the files themselves have no problems.
    """

    def __init__(self, summary: str, problems: dict[str, list[str]] | None = None):
        self.summary = summary
        self.problems = problems or {}
        parts = [f"{len(keys)} {kind}:\n  " + "\n  ".join(keys) for kind, keys in self.problems.items()]
        super().__init__("\n".join([f"{summary}:" if parts else summary, *parts]))

    def one_line(self, keys_per_kind: int = 3) -> str:
        """The message on one line, naming the first few keys of each kind and counting the rest."""
        kinds = []
        for kind, keys in self.problems.items():
            more = f" and {len(keys) - keys_per_kind} more" if len(keys) > keys_per_kind else ""
            kinds.append(f"{len(keys)} {kind} ({', '.join(keys[:keys_per_kind])}{more})")
        return f"{self.summary}: {'; '.join(kinds)}" if kinds else self.summary


def _checkpoint_files(model_dir: str) -> dict[str, list[str]]:
    """Maps each shard path to the tensor names it holds (None: the names are read from the file)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{index_path} is not valid JSON: {err}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path} has no weight_map")
        shards: dict[str, list[str]] = defaultdict(list)
        for name, shard in weight_map.items():
            shards[os.path.join(model_dir, shard)].append(name)
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"{index_path} names shard files that do not exist: {sorted(missing)}")
        return dict(shards)
    if os.path.isfile(single_path):
        with _open_safetensors(single_path) as f:
            return {single_path: list(f.keys())}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir!r}: the directory holds no weights")


def _encoder_names() -> str:
    """Where each model kind's checkpoint keeps the encoder, for the error that finds none of it."""
    by_projector: dict[str, list] = {}
    for family in FAMILIES.values():
        by_projector.setdefault(family.projector_name, []).append(family)
    kinds = [f"a {titles(families)} checkpoint names them {TOWER_PREFIX}* and {projector}.*"
             for projector, families in by_projector.items()]
    return ", ".join(kinds) + ", a standalone MoonViT tower's patch_embed.* and encoder.*"


def _open_safetensors(path: str):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _encoder_name(name: str, tower_only: bool) -> str | None:
    """The state-dict key a checkpoint tensor fills, or None for tensors the encoder ignores: the
    language model's, and, for a model without projector, any projector's."""
    if name.startswith(TOWER_PREFIX):
        return name
    if name.startswith(PROJECTOR_PREFIXES):
        # A tower-only model takes a full Kimi-VL or Kimi-K2.5 checkpoint too, and leaves its projector.
        return None if tower_only else name
    if tower_only and name.startswith(("patch_embed.", "encoder.")):
        return TOWER_PREFIX + name
    return None


def _projector_prefix(expected: Mapping[str, Sequence[int]], projector_name: str | None) -> str | None:
    """The model's projector prefix (`projector_name` + "."), None for a model without projector."""
    if projector_name is not None:
        prefix = f"{projector_name}."
        if prefix not in PROJECTOR_PREFIXES:
            raise ValueError(f"projector_name must be one of {', '.join(p[:-1] for p in PROJECTOR_PREFIXES)}, "
                             f"got {projector_name!r}")
        return prefix if any(k.startswith(prefix) for k in expected) else None
    return next((p for p in PROJECTOR_PREFIXES if any(k.startswith(p) for k in expected)), None)


def match_checkpoint(model_dir: str | os.PathLike, expected: Mapping[str, Sequence[int]],
                     projector_name: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """Checks the checkpoint in `model_dir` against `expected` (state-dict key -> shape), reading only
    the files' headers, and maps each file to the (key, checkpoint name) pairs it fills.

    `projector_name` is the model config's (`multi_modal_projector` or `mm_projector`; left out, it is
    the one `expected` holds). A model whose `expected` has no projector is a tower alone: it ignores
    every projector tensor of the checkpoint. Tensors outside `vision_tower.*` and the projectors (the
    language model's) are ignored unread.

    Raises `CheckpointError` listing every missing, unexpected, misshaped, duplicated and absent key.
    """
    model_dir = os.fspath(model_dir)
    expected = {k: tuple(shape) for k, shape in expected.items()}
    projector = _projector_prefix(expected, projector_name)
    tower_only = projector is None
    files = _checkpoint_files(model_dir)

    sources: dict[str, tuple[str, str]] = {}
    unexpected: list[str] = []
    duplicated: list[str] = []
    other_projector: set[str] = set()
    for path, names in files.items():
        for name in names:
            key = _encoder_name(name, tower_only)
            if key is None:
                continue
            if not key.startswith(TOWER_PREFIX) and not key.startswith(projector):
                other_projector.add(key.split(".", 1)[0])
            if key not in expected:
                unexpected.append(name)
            elif key in sources:
                duplicated.append(f"{key}: both {sources[key][1]} and {name}")
            else:
                sources[key] = (path, name)

    misshaped: list[str] = []
    absent: list[str] = []
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, (path, name) in sources.items():
        by_file[path].append((key, name))
    for path, pairs in by_file.items():
        with _open_safetensors(path) as f:
            stored = set(f.keys())
            for key, name in pairs:
                if name not in stored:
                    absent.append(f"{name}: the index names {os.path.basename(path)}, which lacks it")
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[key]:
                    misshaped.append(f"{name}: checkpoint {shape}, model {expected[key]}")
    missing = sorted(set(expected) - set(sources))
    problems = {title: items for title, items in (
        ("missing", missing), ("unexpected", sorted(unexpected)), ("misshaped", sorted(misshaped)),
        ("given twice", sorted(duplicated)), ("absent from their shard", sorted(absent))) if items}
    if problems:
        summary = f"checkpoint {model_dir!r} does not match the model"
        if not sources:
            summary += f" (none of its tensors is the encoder's: {_encoder_names()})"
        elif other_projector:
            found = ", ".join(f"{p}.*" for p in sorted(other_projector))
            summary += (f" (its projector is {found}, but config.json describes a model whose projector is "
                        f"{projector}*: is config.json from another model?)")
        raise CheckpointError(summary, problems)
    return dict(by_file)


def load_encoder_state(model: nn.Module, model_dir: str | os.PathLike) -> None:
    """Copies the encoder's tensors from `model_dir` into `model` (keys as in the Kimi-VL or Kimi-K2.5
    checkpoint; the projector's prefix is `model.config.projector_name`).

    Reads only the encoder's tensors, memory-mapped, converting each to the parameter's dtype and
    device. Raises `CheckpointError` listing every missing, unexpected and misshaped key before any
    parameter is written.
    """
    expected = model.state_dict()
    config = getattr(model, "config", None)
    by_file = match_checkpoint(model_dir, {k: v.shape for k, v in expected.items()},
                               getattr(config, "projector_name", None))
    with torch.no_grad():
        for path, pairs in by_file.items():
            with safe_open(path, framework="pt") as f:
                for key, name in pairs:
                    target = expected[key]
                    target.copy_(f.get_tensor(name).to(dtype=target.dtype))
