"""CUDA paths: the same parity on the GPU. Skipped cleanly where no CUDA device is present.
Run: .venv/bin/python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.checkpoints import load_model
from tests.helpers import hf_model, tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def exact_matmuls():
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would blur a 1e-4 comparison
    yield


@pytest.mark.parametrize("variant", ["gemma3", "e2b", "26b-a4b", "31b"])
def test_cuda_fp32_logits_match_transformers(variant, tmp_path):
    """On CUDA in fp32, gemmakit's logits equal transformers' (also on CUDA) to 1e-4."""
    ref = hf_model(tiny(variant))
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 1000, (2, 29), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        expected = ref.cuda()(ids).logits
        got = load_model(tmp_path, device="cuda")(ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cuda_bf16_error_is_no_worse_than_the_reference(tmp_path):
    """In bf16 on CUDA, gemmakit's distance to the fp32 result is within the reference's own (x1.5)."""
    ref = hf_model(tiny("e4b"))
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, 1000, (1, 29), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        exact = ref.cuda()(ids).logits
        ref_err = (ref.to(torch.bfloat16)(ids).logits.float() - exact).abs().max()
        ours = load_model(tmp_path, dtype=torch.bfloat16, device="cuda")(ids).float()
    assert (ours - exact).abs().max() <= 1.5 * ref_err
