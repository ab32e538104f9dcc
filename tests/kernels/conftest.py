"""Kernel tests run on the GPU when there is one, else on CPU tensors under the Triton interpreter.

Triton chooses between compiling and interpreting when a kernel is decorated, i.e. when
fused_moonvit.kernels is first imported, so the switch is set here, before any test module imports it.
If an earlier conftest imported the kernels first, the `device` fixture stops with a clear message
instead of letting Triton fail on CPU pointers.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for kernel_cases, whatever pytest's import mode


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    from fused_moonvit.kernels.plan import _expand_plan_kernel

    if type(_expand_plan_kernel).__name__ != "InterpretedFunction":
        pytest.fail("fused_moonvit.kernels was imported before TRITON_INTERPRET=1 was set; set it earlier")
    return torch.device("cpu")
