"""Test-session setup: run Triton kernels in the CPU interpreter when no CUDA device is present.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, before any test module
imports ``kernels.triton_quant``. An existing value is left alone.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
