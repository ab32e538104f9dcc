"""The wheel installs one namespace, `fused_moonvit`, and no top-level `kernels` or `integration`."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from forked_cases import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_fused_moonvit(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fused_moonvit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fused_moonvit", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for pkg in ("kernels", "moonvit", "integration", "benchmarks"):
        assert f"fused_moonvit/{pkg}/__init__.py" in names
    # The measured attention table choose_attention reads at run time travels with the code.
    assert "fused_moonvit/moonvit/attention_table.json" in names
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    entry = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "fused-moonvit = fused_moonvit.moonvit.cli:main" in entry
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License: Apache-2.0" in metadata.splitlines()
    # setuptools >= 77 puts license files under licenses/, older ones beside METADATA
    (license_file,) = [n for n in names if n.startswith(dist_info) and n.endswith("/LICENSE")]
    assert zipfile.ZipFile(wheel).read(license_file) == (ROOT / "LICENSE").read_bytes()
