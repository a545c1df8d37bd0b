"""Forward + backward time of the MLA attention core under each SDPA backend (one GPU).

MLA's query/key head dim (nope + rope = 96 at the large preset) differs from its value head dim
(64). This measures what each scaled_dot_product_attention backend makes of that shape, and of
the same shape with the value zero-padded to the key width, at batch x 12 heads x 1024 tokens.

    python benchmarks/attention_backends.py --batch 32
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--qk-dim", type=int, default=96)
    parser.add_argument("--v-dim", type=int, default=64)
    args = parser.parse_args()
    b, h, l = args.batch, args.heads, args.seq_len
    q, k = (torch.randn(b, h, l, args.qk_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
    v = torch.randn(b, h, l, args.v_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * b * h * l * l * (args.qk_dim + args.v_dim)  # forward + backward (2x), non-causal
    print(f"{'backend':>10} {'value':>12} {'ms fwd+bwd':>11} {'TFLOP/s':>8}")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for padded in (False, True):
            def run(backend: SDPBackend = backend, padded: bool = padded) -> None:
                vv = F.pad(v, (0, args.qk_dim - args.v_dim)) if padded else v
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, vv)
                out[..., : args.v_dim].sum().backward()
            try:
                ms = time_ms(run)
                print(f"{backend.name:>10} {'padded' if padded else 'as is':>12} {ms:>11.3f} {flops / ms / 1e9:>8.1f}")
            except RuntimeError as exc:
                reason = str(exc).splitlines()[0][:60]
                print(f"{backend.name:>10} {'padded' if padded else 'as is':>12} {'n/a':>11} ({reason})")


if __name__ == "__main__":
    main()
