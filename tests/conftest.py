"""Process-wide test setup; the shared helpers live in moonvit_fixtures.py (a unique module name, since
tests/kernels has a conftest of its own)."""

from __future__ import annotations

import os

# vLLM picks its platform at import; the parity peer runs on the CPU.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch

# On a host with AMX tiles, vLLM's CPU platform picks its AMX attention for MLA models (the tests' tiny
# Kimi text models are DeepseekV2, MLA), whose kernels (torch.ops._C.convert_weight_packed) are not in the
# CUDA wheels of vLLM on PyPI that the tests install: building the parity peer then fails. The tests
# compare encoders, not vLLM's CPU attention, so vLLM is told there are no AMX tiles.
if torch.cpu._is_amx_tile_supported():
    torch.cpu._is_amx_tile_supported = lambda: False

# Without a GPU the Triton kernels run under the interpreter, which must be chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # vLLM 0.34's CPU platform refuses x86 without triton-cpu unless CUDA_VISIBLE_DEVICES is set and empty
    # (read when vLLM is imported; the plugin tests' subprocesses inherit it). There is no GPU to hide.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
