"""Test-session setup shared by every test module."""

import os
import tempfile

import torch

# The weight-digest cache (model/weights_cache.py) goes to a folder of this session, not the user's cache.
os.environ.setdefault("BATCHRUN_CACHE_DIR", tempfile.mkdtemp(prefix="batchrun-test-cache-"))

# Triton kernels run in Triton's CPU interpreter when there is no CUDA GPU. triton.jit reads this flag when a
# kernel module is imported, so it is set here, before any test module imports batchrun.kernels.
# An explicit TRITON_INTERPRET in the environment wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
