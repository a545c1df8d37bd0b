"""Random-weight denoisers of the model presets (configs/model), the timing of one sampled batch and of one call,
for the speed benchmarks.

Random weights cost the same FLOPs and time as trained ones. adaLN-Zero starts every gate at zero, which would
make each gated block the identity; the zero parameters are drawn like the others, so that every block works.
"""

from __future__ import annotations

import time

import torch

from mdlm_sched.config_load import load
from mdlm_sched.modelset import PreparedDenoiser
from mdlm_sched.models import denoiser_config
from mdlm_sched.models.denoiser import MDLMDenoiser
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampler import SampleResult, sample
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import ModelSchedule

GPT2 = 50257  # tokenizer length ([MASK] is appended)
SMOKE_LEN = 64
SMOKE = ("model.hidden_size=64", "model.num_attention_heads=4", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
         "model.qk_rope_head_dim=8", "model.v_head_dim=16", f"model.max_seq_len={SMOKE_LEN}",
         f"data.seq_len={SMOKE_LEN}")


def random_denoiser(preset: str, device: torch.device, smoke: bool = False, compile: bool = False,
                    graph_rows: int = 0, compile_latent: bool = False, latent_graphs: bool = False,
                    cast_fold: bool = False) -> PreparedDenoiser:
    """A random-weight denoiser of configs/model/<preset>.yaml (tiny widths with smoke), bf16 autocast on a GPU,
    dropout off (the sampler's eval mode); cast_fold: PreparedDenoiser's cast_weights and fold_modulation."""
    return random_denoiser_of([f"model={preset}", *(SMOKE if smoke else ())], device, compile, graph_rows,
                              compile_latent, latent_graphs, cast_fold)


def random_denoiser_of(words: list[str], device: torch.device, compile: bool = False, graph_rows: int = 0,
                       compile_latent: bool = False, latent_graphs: bool = False,
                       cast_fold: bool = False) -> PreparedDenoiser:
    """A random-weight denoiser of the model that config words describe (e.g. a benchmark's run), as above."""
    # random weights read no data: the preset's data files need not be on this machine (the GPU's has no ../shared)
    config = denoiser_config(load([*words, "model.dropout=0.0"], sources=False), GPT2, GPT2 - 1, "")
    torch.manual_seed(config.num_hidden_layers)
    model = MDLMDenoiser(config).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return PreparedDenoiser(model, torch.bfloat16 if device.type == "cuda" else None, compile, graph_rows,
                            compile_latent, latent_graphs, cast_weights=cast_fold, fold_modulation=cast_fold)


def timed(models: dict[str, PreparedDenoiser], schedule: ModelSchedule, settings: SamplerSettings, batch: int,
          seq_len: int, seed: int) -> tuple[float, SampleResult]:
    """Wall-clock seconds of one sampled batch (the GPU idle before it and waited for after it), and its result."""
    device = next(iter(models.values())).device
    generator = torch.Generator(device).manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = sample(models, schedule, LogLinearNoise(1e-3), settings, generator, batch, seq_len)
    result.tokens.cpu()  # waits for the GPU
    return time.perf_counter() - start, result


def time_ms(fn, device: torch.device, reps: int = 20, warm_up: int = 3) -> float:
    """Median milliseconds of fn over reps after warm_up untimed calls (CUDA events on a GPU, the host clock on a
    CPU)."""
    for _ in range(warm_up):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]
