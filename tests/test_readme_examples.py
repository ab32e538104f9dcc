"""The README's Python examples, run as a reader runs them: in order, in one session, in a folder holding
the files they name (small generated images and a folder of frames). The only change to their text is
the one the README itself offers: each checkpoint path becomes None, which gives seeded random weights of
the architecture the call names. A block that needs a CUDA device, as the README says before it, runs
where there is one; elsewhere it is compiled only."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fused_moonvit.moonvit.families import FAMILIES, KIMI_K25, KIMI_VL, family_of
from fused_moonvit.moonvit.preprocess import tokens_per_image

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_PATH = r'"/path/to/[^"]+"'
NEEDS_CUDA = "needs a CUDA device"


def _python_blocks() -> list[tuple[str, str]]:
    """(the paragraph before it, its code) for each ```python block of the README."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        before = text[:match.start()].rstrip().rsplit("\n\n", 1)[-1]
        blocks.append((before, match.group(1)))
    return blocks


def _uses_cuda(code: str) -> bool:
    return bool(re.search(r"""["']cuda["']|\.cuda\(""", code))


def _files_the_examples_name(folder: Path) -> None:
    """a.jpg and b.png of different shapes, and frames/ with 5 frames: one chunk of 4 and one of 1."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (42, 70, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (56, 28, 3), dtype=np.uint8)).save(folder / "b.png")
    (folder / "frames").mkdir()
    for t in range(5):
        Image.fromarray(rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)).save(folder / "frames" / f"{t:02d}.png")


def test_the_readme_has_the_examples_this_file_checks():
    blocks = _python_blocks()
    assert blocks
    for _, code in blocks:
        assert re.search(CHECKPOINT_PATH, code), "each example reads a checkpoint, which this test replaces"
    # Only a block the README introduces as needing a GPU may go unrun on a CPU.
    for before, code in blocks:
        assert _uses_cuda(code) == (NEEDS_CUDA in before), (before, code)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    _files_the_examples_name(tmp_path)
    monkeypatch.chdir(tmp_path)
    session = {}
    checked = set()
    for _, code in _python_blocks():
        code = re.sub(CHECKPOINT_PATH, "None", code)
        if _uses_cuda(code) and not torch.cuda.is_available():
            compile(code, "README.md", "exec")
            continue
        exec(compile(code, "README.md", "exec"), session)
        if "preprocess_images" in code:
            # Kimi-VL: one (h/2 * w/2, 2048) row block per image, in order.
            grid_hws = session["grid_hws"]
            assert grid_hws.tolist() == [[4, 6], [4, 2]]
            assert family_of(session["reference"].config) is KIMI_VL
            assert session["embeddings"].shape == (sum(tokens_per_image(grid_hws)), 2048)
            assert torch.isfinite(session["embeddings"]).all()
            checked.add("Kimi-VL reference")
        if "runner" in code:
            per_image = session["per_image"]
            assert [len(out) for out in per_image] == tokens_per_image(session["grid_hws"])
            assert all(out.shape[1] == 2048 and torch.isfinite(out).all() for out in per_image)
            checked.add("fused runner")
        if "KimiK25Inputs" in code:
            # Kimi-K2.5 at its real size, with the processors' defaults: 5 frames of 2x4 patches make a
            # chunk of 4 and a chunk of 1.
            assert session["grid"] == (1, 4, 6)
            assert session["chunk_grids"].tolist() == [[4, 2, 4], [1, 2, 4]]
            k25 = session["k25"]
            assert family_of(k25.config) is KIMI_K25 and k25.config.text_hidden_size == 7168
            chunks = session["chunk_grids"][:, 1:]
            assert session["embeddings"].shape == (sum(tokens_per_image(chunks)), 7168)
            assert torch.isfinite(session["embeddings"]).all()
            checked.add("Kimi-K2.5")
    gpu_only = {"fused runner"} if torch.cuda.is_available() else set()
    assert checked == {"Kimi-VL reference", "Kimi-K2.5"} | gpu_only


def test_readme_names_every_family_build_model_takes():
    """The README's sentence on `build_model`'s `family` names each family of moonvit/families.py."""
    text = " ".join((ROOT / "README.md").read_text().split())
    (sentence,) = re.findall(r"`build_model`'s `family` is [^:]+:", text)
    assert re.findall(r'`"([\w-]+)"`', sentence) == list(FAMILIES)
    for family in FAMILIES.values():
        assert f'`"{family.name}"` ({family.title}' in sentence, family.title
