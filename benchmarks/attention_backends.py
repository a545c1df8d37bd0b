"""Forward + backward time of the MLA attention core under each SDPA backend (one GPU).

MLA's query/key head dim (nope + rope = 96 at the large preset) differs from its value head dim
(64). This measures what each scaled_dot_product_attention backend makes of that shape, and of
the same shape with the value zero-padded to the key width, at batch x 12 heads x 1024 tokens.

    python benchmarks/attention_backends.py --batch 32

The math backend (PyTorch's reference) is timed beside them. `--device cpu` runs only the math backend at
float32: a check that the script runs (tests/test_benchmark_smoke.py), not a measurement.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from presets import time_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--qk-dim", type=int, default=96)
    parser.add_argument("--v-dim", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (a check of the script: the math backend only)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, h, l = args.batch, args.heads, args.seq_len
    q, k = (torch.randn(b, h, l, args.qk_dim, device=device, dtype=dtype, requires_grad=True) for _ in "qk")
    v = torch.randn(b, h, l, args.v_dim, device=device, dtype=dtype, requires_grad=True)
    flops = 3 * 2 * b * h * l * l * (args.qk_dim + args.v_dim)  # forward + backward (2x), non-causal
    print(f"{'backend':>10} {'value':>12} {'ms fwd+bwd':>11} {'TFLOP/s':>8}")
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH] if device.type == "cuda" else [SDPBackend.MATH]
    for backend in backends:
        for padded in (False, True):
            def run(backend: SDPBackend = backend, padded: bool = padded) -> None:
                vv = F.pad(v, (0, args.qk_dim - args.v_dim)) if padded else v
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, vv)
                out[..., : args.v_dim].sum().backward()
            try:
                ms = time_ms(run, device, args.reps)
                print(f"{backend.name:>10} {'padded' if padded else 'as is':>12} {ms:>11.3f} {flops / ms / 1e9:>8.1f}")
            except RuntimeError as exc:
                reason = str(exc).splitlines()[0][:60]
                print(f"{backend.name:>10} {'padded' if padded else 'as is':>12} {'n/a':>11} ({reason})")


if __name__ == "__main__":
    main()
