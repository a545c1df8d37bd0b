"""The output head's cross-entropy under SUBS, through PyTorch or a fused linear + cross-entropy kernel library.

A 12 x 768 denoiser's head is a [d, 50k] matmul whose logits (M x 50k floats per micro-batch) cost memory
traffic out of proportion to their FLOPs. liger-kernel and cut-cross-entropy compute -log p(target) from the
hidden states and the head's weight in chunks, never writing the logits out. Both are optional extras
(`pip install 'mdlm-sched[liger]'` or `'[cce]'`, GPU only); "torch" is the reference path and the default.

SUBS gives [MASK] zero probability: the PyTorch path (diffusion.masked_nll on the logits) sets its logit to -inf;
here its row of the head is dropped (with the padded rows past vocab_size), which is the same softmax.
"""

from __future__ import annotations

import importlib

import torch

from mdlm_sched.errors import ConfigError

# config.LOSS_KERNELS' fused ones -> (the module each needs, its pip extra)
_LIBRARIES = {"liger": ("liger_kernel", "liger"), "cce": ("cut_cross_entropy", "cce")}


def require_loss_kernel(kernel: str, device: torch.device, head_bias: bool) -> None:
    """Refuse a fused kernel that is not installed, asked for off a CUDA device (both are Triton kernels), or
    that cannot take the model's head (cut-cross-entropy has no bias)."""
    if kernel not in _LIBRARIES:  # "torch" (config_checks refused the unknown names)
        return
    module, extra = _LIBRARIES[kernel]
    if kernel == "cce" and head_bias:
        raise ConfigError("train.loss_kernel=cce takes no head bias and this model's head has one; set "
                          "train.loss_kernel=liger or torch")
    if device.type != "cuda":
        raise ConfigError(f"train.loss_kernel={kernel} runs Triton kernels on a CUDA device, not {device.type}; "
                          "set train.loss_kernel=torch")
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"train.loss_kernel={kernel} needs {module} ({e}); pip install 'mdlm-sched[{extra}]' "
                          "or set train.loss_kernel=torch") from None


def _without_row(t: torch.Tensor, row: int, end: int) -> torch.Tensor:
    """t[:end] without t[row]: a view when row is the last (GPT-2's [MASK] is), else a copy."""
    return t[:row] if row == end - 1 else torch.cat((t[:row], t[row + 1:end]))


def head_without_mask(weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, vocab_size: int,
                      mask_id: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The head's rows [V - 1, d] and bias [V - 1] without [MASK] and the padding, and targets [M] as indices
    into them: a plain softmax over these rows is SUBS's over the vocabulary."""
    rows = _without_row(weight, mask_id, vocab_size)
    kept_bias = None if bias is None else _without_row(bias, mask_id, vocab_size)
    return rows, kept_bias, targets - (targets > mask_id).long()


def fused_head_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   vocab_size: int, mask_id: int, kernel: str) -> torch.Tensor:
    """-log p(targets) [M] (float32) under SUBS from hidden [M, d] through the head weight [V', d] and bias [V'],
    by the fused kernel of kernel ("liger" or "cce"); the logits are never written out.

    Rows of the head past vocab_size are padding. Under autocast the kernel runs in the autocast dtype, as the
    head's nn.Linear would. targets never hold mask_id (they are clean tokens).
    """
    if torch.is_autocast_enabled(hidden.device.type):  # the kernels run outside autocast: cast as it would
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    rows, kept_bias, targets = head_without_mask(weight, bias, targets, vocab_size, mask_id)
    if kernel == "cce" and kept_bias is not None:  # require_loss_kernel refuses this before training starts
        raise ValueError("cut-cross-entropy takes no head bias")
    return _kernel(kernel, hidden, rows, kept_bias, targets).float()


@torch.compiler.disable  # the libraries' own Triton kernels, run as they are: torch.compile splits the graph here
def _kernel(kernel: str, hidden: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(hidden rows^T + bias)[targets] [M] by the named library, outside autocast."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if kernel == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            return liger_fused_linear_cross_entropy(hidden, rows, targets, bias=bias, reduction="none")
        if kernel == "cce":
            from cut_cross_entropy import linear_cross_entropy
            return linear_cross_entropy(hidden, rows, targets, reduction="none")
    raise ConfigError(f"train.loss_kernel={kernel} is not a fused kernel (liger, cce)")
