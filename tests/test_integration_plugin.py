"""The `vllm.general_plugins` entry point, through the installed vLLM's (0.33.0 or 0.34.0) own plugin loader and
model registry.

Each case runs in a fresh interpreter: plugin loading and model registration are process-wide state in
vLLM, and the switches under test are environment variables read at load time.
"""

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from moonvit_fixtures import tiny_config
from vllm_peer import write_tiny_kimi_k25_dir, write_tiny_kimi_vl_dir

pytestmark = pytest.mark.vllm

OURS = "fused_moonvit.integration.kimi_vl:FusedKimiVLForConditionalGeneration"
STOCK = "vllm.model_executor.models.kimi_vl:KimiVLForConditionalGeneration"
OURS_K25 = "fused_moonvit.integration.kimi_k25:FusedKimiK25ForConditionalGeneration"
STOCK_K25 = "vllm.model_executor.models.kimi_k25:KimiK25ForConditionalGeneration"
LOG_MARK = "fused-moonvit:"
# vLLM 0.33.0 and 0.34.0 both have Kimi-K2.5; a release without it keeps the Kimi-VL swap only.
HAS_K25 = importlib.util.find_spec("vllm.model_executor.models.kimi_k25") is not None

PROBE = r"""
import json, sys
from vllm import ModelRegistry
from vllm.config import LoggingConfig
from vllm.logger import configure_logging
from vllm.plugins import load_general_plugins

# As vLLM's engine-core and worker processes do before they load plugins.
configure_logging(LoggingConfig())
load_general_plugins()
load_general_plugins()
ours_loaded = sorted(m for m in sys.modules if m.startswith("fused_moonvit."))
if "--register-again" in sys.argv:
    from fused_moonvit.integration import plugin
    plugin.register()
archs = ["KimiVLForConditionalGeneration"]
if "--k25" in sys.argv:
    archs.append("KimiK25ForConditionalGeneration")
registry = {}
for arch in archs:
    cls = ModelRegistry._try_load_model_cls(arch)
    registry[arch] = f"{cls.__module__}:{cls.__qualname__}"
result = {"modules_after_plugins": ours_loaded, "registry": registry, "resolved": {}}
if "--model-dirs" in sys.argv:
    from vllm.config import ModelConfig
    from vllm.model_executor.model_loader import get_model_architecture
    for directory in sys.argv[sys.argv.index("--model-dirs") + 1:]:
        config = ModelConfig(model=directory, skip_tokenizer_init=True)
        resolved, arch = get_model_architecture(config)
        stock = getattr(resolved, "vllm_class", resolved)  # our class's vLLM parent
        result["resolved"][arch] = {"class": f"{resolved.__module__}:{resolved.__qualname__}",
                                    "multimodal": config.is_multimodal_model,
                                    "stock_processor": resolved._processor_factory is stock._processor_factory}
print("PROBE " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = [write_tiny_kimi_vl_dir(tmp_path_factory.mktemp("kimi_vl_config"), tiny_config())]
    if HAS_K25:
        dirs.append(write_tiny_kimi_k25_dir(tmp_path_factory.mktemp("kimi_k25_config"),
                                            tiny_config(tower="moonvit3d", pos_emb_time=4)))
    return dirs


CASES = {
    "default": ({}, ["--register-again"]),
    "disabled": ({"FUSED_MOONVIT_DISABLE": "1"}, []),
    "filtered_out": ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, []),
    "filtered_in": ({"VLLM_PLUGINS": "fused_moonvit"}, []),
}


@pytest.fixture(scope="module")
def probes(model_dirs):
    """Runs every case's probe at once (each spends most of its time importing vLLM)."""
    running = {}
    for name, (env, args) in CASES.items():
        full_env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "FUSED_MOONVIT_DISABLE")}
        full_env.update(env, VLLM_TARGET_DEVICE="cpu")
        args = args + (["--k25"] if HAS_K25 else [])
        if name == "default":
            args = args + ["--model-dirs", *map(str, model_dirs)]
        running[name] = subprocess.Popen([sys.executable, "-c", PROBE, *args], env=full_env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results = {}
    try:
        for name, proc in running.items():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name} probe failed:\n{out}"
            line = next(l for l in out.splitlines() if l.startswith("PROBE "))
            results[name] = (json.loads(line[len("PROBE "):]), [l for l in out.splitlines() if LOG_MARK in l])
    finally:
        for proc in running.values():  # a failed or timed-out probe must not leave the others running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_entry_point_is_installed():
    ours = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "fused_moonvit"]
    assert [ep.value for ep in ours] == ["fused_moonvit.integration.plugin:register"]


def test_registry_resolves_to_fused_class(probes):
    result, log = probes["default"]
    assert result["registry"] == {"KimiVLForConditionalGeneration": OURS} | (
        {"KimiK25ForConditionalGeneration": OURS_K25} if HAS_K25 else {})
    # What vLLM itself does when it loads a model: ModelConfig inspects the class (in a subprocess)
    # and the loader resolves the architecture, from each model directory's config.json.
    assert {arch: r["class"] for arch, r in result["resolved"].items()} == result["registry"]
    for arch, resolved in result["resolved"].items():
        assert resolved["multimodal"] is True, arch
        # The multimodal processor registered on vLLM's class is the one vLLM finds for ours.
        assert resolved["stock_processor"] is True, arch
    # Loading the plugin imports nothing of ours beyond the plugin module itself.
    assert result["modules_after_plugins"] == ["fused_moonvit.integration", "fused_moonvit.integration.plugin"]
    # Idempotent: vLLM loads it once per process, a second register() is a no-op (one log line).
    assert len(log) == 1
    swapped = "KimiVLForConditionalGeneration and KimiK25ForConditionalGeneration use" if HAS_K25 else \
        "KimiVLForConditionalGeneration uses"
    assert f"{swapped} the fused MoonVit encoder" in log[0]


def test_disable_env_keeps_stock_class(probes):
    result, log = probes["disabled"]
    assert result["registry"] == {"KimiVLForConditionalGeneration": STOCK} | (
        {"KimiK25ForConditionalGeneration": STOCK_K25} if HAS_K25 else {})
    assert len(log) == 1 and "FUSED_MOONVIT_DISABLE" in log[0]


def test_vllm_plugins_filter(probes):
    result, log = probes["filtered_out"]
    assert result["registry"]["KimiVLForConditionalGeneration"] == STOCK
    assert result["modules_after_plugins"] == [] and log == []
    result, log = probes["filtered_in"]
    assert result["registry"]["KimiVLForConditionalGeneration"] == OURS
    assert len(log) == 1
