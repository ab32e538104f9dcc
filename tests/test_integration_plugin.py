"""The `vllm.general_plugins` entry point, through the installed vLLM's (0.33.0 or 0.34.0) own plugin loader and
model registry.

Each case runs in a process of its own: plugin loading and model registration are process-wide state in
vLLM, and the switches under test are environment variables read at load time. The cases are forked, one
after another, from one interpreter that has imported vLLM and loaded no plugin (forked_cases.py): importing
vLLM is most of a case's time.
"""

import importlib.util
import json
import os
from importlib.metadata import entry_points

import pytest

from forked_cases import run_cases
from moonvit_fixtures import K3_OPTIONS, tiny_config
from vllm_peer import write_tiny_kimi_k3_dir, write_tiny_kimi_k25_dir, write_tiny_kimi_vl_dir

pytestmark = pytest.mark.vllm

OURS = "fused_moonvit.integration.kimi_vl:FusedKimiVLForConditionalGeneration"
STOCK = "vllm.model_executor.models.kimi_vl:KimiVLForConditionalGeneration"
OURS_K25 = "fused_moonvit.integration.kimi_k25:FusedKimiK25ForConditionalGeneration"
STOCK_K25 = "vllm.model_executor.models.kimi_k25:KimiK25ForConditionalGeneration"
OURS_K3 = "fused_moonvit.integration.kimi_k3:FusedKimiK3ForConditionalGeneration"
STOCK_K3 = "vllm.models.kimi_k3.nvidia.model:KimiK3ForConditionalGeneration"
K3_ARCHS = ("KimiK3ForConditionalGeneration", "KimiK31ForConditionalGeneration")
LOG_MARK = "fused-moonvit:"
# vLLM 0.33.0 and 0.34.0 both have Kimi-K2.5; a release without it keeps the Kimi-VL swap only.
HAS_K25 = importlib.util.find_spec("vllm.model_executor.models.kimi_k25") is not None
# Kimi-K3: vLLM 0.33.0 registers KimiK3ForConditionalGeneration, 0.34.0 K3.1 as well (one class). Which
# names this vLLM knows is read from its registry in the probe; the plugin must swap exactly those.

# Imported once for all cases: what PROBE imports before it loads the plugins, and vLLM's own Kimi model
# modules, which resolving an architecture imports, stock or ours (seconds each). Nothing of ours.
PRELUDE = """
from vllm import ModelRegistry
from vllm.config import LoggingConfig
from vllm.logger import configure_logging
from vllm.plugins import load_general_plugins
"""

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
known = set(ModelRegistry.get_supported_archs())
archs += [arch for arch in ("KimiK3ForConditionalGeneration", "KimiK31ForConditionalGeneration") if arch in known]
registry = {}
for arch in archs:
    cls = ModelRegistry._try_load_model_cls(arch)
    registry[arch] = f"{cls.__module__}:{cls.__qualname__}"
result = {"modules_after_plugins": ours_loaded, "registry": registry, "resolved": {},
          "k3_known": sorted(a for a in ("KimiK3ForConditionalGeneration", "KimiK31ForConditionalGeneration") if a in known)}
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


def known_k3_archs() -> list[str]:
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    return [arch for arch in K3_ARCHS if arch in known]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = [write_tiny_kimi_vl_dir(tmp_path_factory.mktemp("kimi_vl_config"), tiny_config())]
    if HAS_K25:
        dirs.append(write_tiny_kimi_k25_dir(tmp_path_factory.mktemp("kimi_k25_config"),
                                            tiny_config(tower="moonvit3d", pos_emb_time=4)))
    for arch in known_k3_archs():  # a config.json naming each K3 architecture this vLLM knows
        dirs.append(write_tiny_kimi_k3_dir(tmp_path_factory.mktemp(arch), tiny_config(
            tower="moonvit3d", pos_emb_time=4, **K3_OPTIONS), architecture=arch))
    return dirs


CASES = {
    "default": ({}, ["--register-again"]),
    "disabled": ({"FUSED_MOONVIT_DISABLE": "1"}, []),
    "filtered_out": ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, []),
    "filtered_in": ({"VLLM_PLUGINS": "fused_moonvit"}, []),
}


@pytest.fixture(scope="module")
def probes(model_dirs):
    cases = {}
    for name, (env, args) in CASES.items():
        args = args + (["--k25"] if HAS_K25 else [])
        if name == "default":
            args = args + ["--model-dirs", *map(str, model_dirs)]
        cases[name] = (args, env)
    # The switches only where a case sets them.
    base = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "FUSED_MOONVIT_DISABLE")}
    stock = [STOCK] + ([STOCK_K25] if HAS_K25 else []) + ([STOCK_K3] if known_k3_archs() else [])
    prelude = PRELUDE + "".join(f"import {name.split(':')[0]}\n" for name in stock)
    results = {}
    for name, proc in run_cases(prelude, PROBE, cases, env=base | {"VLLM_TARGET_DEVICE": "cpu"}).items():
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} probe failed:\n{out}"
        line = next(l for l in out.splitlines() if l.startswith("PROBE "))
        results[name] = (json.loads(line[len("PROBE "):]), [l for l in out.splitlines() if LOG_MARK in l])
    return results


def test_entry_point_is_installed():
    ours = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "fused_moonvit"]
    assert [ep.value for ep in ours] == ["fused_moonvit.integration.plugin:register"]


def test_registry_resolves_to_fused_class(probes):
    result, log = probes["default"]
    k3 = result["k3_known"]
    assert k3 == sorted(known_k3_archs())
    assert result["registry"] == {"KimiVLForConditionalGeneration": OURS} | (
        {"KimiK25ForConditionalGeneration": OURS_K25} if HAS_K25 else {}) | {arch: OURS_K3 for arch in k3}
    # What vLLM itself does when it loads a model: ModelConfig inspects the class (in a subprocess)
    # and the loader resolves the architecture, from each model directory's config.json.
    assert {arch: r["class"] for arch, r in result["resolved"].items()} == result["registry"]
    for arch, resolved in result["resolved"].items():
        assert resolved["multimodal"] is True, arch
        # The multimodal processor registered on vLLM's class is the one vLLM finds for ours.
        assert resolved["stock_processor"] is True, arch
    # Loading the plugin imports, of ours, the plugin and the family declarations it reads: no drop-in
    # (each imports its vLLM model module) and no Triton kernel (limits, items and the launch tables with
    # their checks import no Triton).
    loaded = result["modules_after_plugins"]
    assert {"fused_moonvit.integration.plugin", "fused_moonvit.moonvit.families"} <= set(loaded)
    assert not [m for m in loaded if m.startswith(("fused_moonvit.integration.kimi", "fused_moonvit.integration.drop_in",
                                                   "fused_moonvit.moonvit.fused", "fused_moonvit.kernels."))
                and m not in ("fused_moonvit.kernels.limits", "fused_moonvit.kernels.items", "fused_moonvit.kernels.launch",
                              "fused_moonvit.kernels._checks")]
    # Idempotent: vLLM loads it once per process, a second register() is a no-op (one log line).
    assert len(log) == 1
    swapped = " and ".join(["KimiVLForConditionalGeneration"] + (["KimiK25ForConditionalGeneration"] if HAS_K25 else [])
                           + known_k3_archs())
    assert f"{swapped} use{'' if swapped.count(' and ') else 's'} the fused MoonVit encoder" in log[0]


def test_k3_names_this_vllm_lacks_are_left_alone(probes):
    """vLLM 0.33.0 has no KimiK31ForConditionalGeneration: the plugin registers no such name (it would
    make vLLM claim an architecture it cannot serve); 0.34.0 has both names, and both are ours."""
    result, _ = probes["default"]
    for arch in K3_ARCHS:
        assert (arch in result["registry"]) == (arch in result["k3_known"]), arch


def test_disable_env_keeps_stock_class(probes):
    result, log = probes["disabled"]
    assert result["registry"] == {"KimiVLForConditionalGeneration": STOCK} | (
        {"KimiK25ForConditionalGeneration": STOCK_K25} if HAS_K25 else {}) | {
        arch: STOCK_K3 for arch in result["k3_known"]}
    assert len(log) == 1 and "FUSED_MOONVIT_DISABLE" in log[0]


def test_vllm_plugins_filter(probes):
    result, log = probes["filtered_out"]
    assert result["registry"]["KimiVLForConditionalGeneration"] == STOCK
    assert result["modules_after_plugins"] == [] and log == []
    result, log = probes["filtered_in"]
    assert result["registry"]["KimiVLForConditionalGeneration"] == OURS
    assert len(log) == 1
