"""The denoiser's head + cross-entropy: the fused kernels' SUBS head equals the PyTorch path's, and the model's
targets path equals the logits path. The kernels themselves are Triton (CUDA): compared on a GPU when installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mdlm_sched.diffusion import masked_nll
from mdlm_sched.errors import ConfigError
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.head_loss import fused_head_nll, head_without_mask, require_loss_kernel


def _head(vocab: int, padded: int, d: int = 16, m: int = 40, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g, dtype=torch.float64)
    weight = torch.randn(padded, d, generator=g, dtype=torch.float64)
    b = torch.randn(padded, generator=g, dtype=torch.float64) if bias else None
    return hidden, weight, b, g


@pytest.mark.parametrize("mask_id", [30, 0, 12])  # the last token (GPT-2's layout), the first, one inside
def test_the_head_without_mask_is_the_subs_softmax(mask_id: int) -> None:
    vocab, padded = 31, 40  # 9 padded rows past the vocabulary
    hidden, weight, bias, g = _head(vocab, padded)
    # Every token but [MASK], and each of them, so that the targets on both sides of mask_id are covered.
    targets = torch.tensor([v for v in range(vocab) if v != mask_id] * 2)[: len(hidden)]
    want = masked_nll(F.linear(hidden, weight, bias)[:, :vocab], targets, mask_id)
    rows, kept_bias, moved = head_without_mask(weight, bias, targets, vocab, mask_id)
    assert rows.shape == (vocab - 1, weight.shape[1]) and kept_bias.shape == (vocab - 1,)
    got = F.cross_entropy(F.linear(hidden, rows, kept_bias), moved, reduction="none")
    torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=1e-6)  # masked_nll works in float32


def test_the_targets_path_of_the_model_equals_its_logits_path() -> None:
    torch.manual_seed(0)
    config = DenoiserConfig(vocab_size=50, mask_token_id=49, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, max_position_embeddings=16,
                            ada_ln=True, zero_head=False, head_bias=True)
    model = MDLMDenoiser(config).double().eval()
    x = torch.randint(0, 49, (3, 16))
    x[:, ::3] = 49
    positions = (x.flatten() == 49).nonzero().squeeze(1)
    targets = torch.randint(0, 49, (len(positions),))
    sigma = torch.rand(3, dtype=torch.float64)
    for head_fp32 in (True, False):
        want = masked_nll(model(x, sigma=sigma, positions=positions, head_fp32=head_fp32), targets, 49)
        got = model(x, sigma=sigma, positions=positions, targets=targets, head_fp32=head_fp32)
        assert got.shape == (len(positions),)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_fused_kernel_is_refused_off_cuda_without_its_library_and_for_a_head_it_cannot_take() -> None:
    require_loss_kernel("torch", torch.device("cpu"), head_bias=True)
    with pytest.raises(ConfigError, match="train.loss_kernel=liger runs Triton kernels on a CUDA device"):
        require_loss_kernel("liger", torch.device("cpu"), head_bias=False)
    with pytest.raises(ConfigError, match="train.loss_kernel=cce takes no head bias"):
        require_loss_kernel("cce", torch.device("cuda"), head_bias=True)
    if importlib.util.find_spec("cut_cross_entropy") is None:
        with pytest.raises(ConfigError, match=r"pip install 'mdlm-sched\[cce\]'"):
            require_loss_kernel("cce", torch.device("cuda"), head_bias=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels are Triton: CUDA only")
@pytest.mark.parametrize("kernel", ["liger", "cce"])
def test_a_fused_kernel_gives_the_pytorch_loss_and_gradients(kernel: str) -> None:
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[kernel]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    vocab, padded, mask_id = 50258, 50304, 50257  # GPT-2 + [MASK], padded to a multiple of 64
    hidden, weight, _, g = _head(vocab, padded, d=768, m=4096, bias=False)
    hidden, weight = (t.float().cuda().requires_grad_(True) for t in (hidden / 4, weight / 30))
    targets = torch.randint(0, mask_id, (len(hidden),), generator=g).cuda()
    scale = torch.rand(len(hidden), device="cuda")  # per-token weights, as the NELBO's w(t)
    results = []
    for fused in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll = fused_head_nll(hidden, weight, None, targets, vocab, mask_id, kernel) if fused else \
                masked_nll(F.linear(hidden, weight)[:, :vocab], targets, mask_id)
        hidden.grad = weight.grad = None
        (scale * nll).sum().backward()
        results.append((nll.detach(), hidden.grad.clone(), weight.grad.clone()))
    (want, want_dh, want_dw), (got, got_dh, got_dw) = results
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 matmuls in both
    for a, b in ((got_dh, want_dh), (got_dw, want_dw)):
        assert float((a - b).norm() / b.norm()) < 3e-2
