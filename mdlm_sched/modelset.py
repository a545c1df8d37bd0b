"""The one way a command gets its denoisers: `open_models` loads named models, checks that they can
share a schedule, and prepares them for sampling on the runtime's device and precision.

Every stage that samples or evaluates denoisers (sample, analyze, sweep, the pipeline) goes
through here, so device choice, precision, backends, compilation and the compatibility check are
set up in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from mdlm_sched.artifacts import model_folder
from mdlm_sched.config import RuntimeConfig
from mdlm_sched.cudagraph import GraphedHidden, GraphedLatent
from mdlm_sched.data import load_tokenizer

from mdlm_sched.errors import CheckpointError
from mdlm_sched.flops import names_light_to_heavy
from mdlm_sched.hub import local_path
from mdlm_sched.models.denoiser import DenoiserConfig, Interface
from mdlm_sched.models.loading import load_denoiser
from mdlm_sched.models.mla import rotary_cos_sin
from mdlm_sched.noise import LogLinearNoise, make_noise
from mdlm_sched.runtime import autocast, autocast_dtype, configure_backends, resolve_device
from mdlm_sched.sampler import check_length
from mdlm_sched.schedule import DEFAULT_T_MIN, ModelSchedule, parse_schedule


def check_compatible(configs: Mapping[str, DenoiserConfig]) -> None:
    """Raise CheckpointError if named denoiser configs differ in a field of their Interface."""
    (first, ref), *others = configs.items()
    for name, config in others:
        for f in fields(Interface):
            a, b = getattr(ref.interface, f.name), getattr(config.interface, f.name)
            if a != b:
                raise CheckpointError(f"models {first!r} and {name!r} differ in {f.name} ({a!r} vs {b!r}); "
                                      f"a schedule can only mix models trained with the same {f.name}")


class PreparedDenoiser:
    """A denoiser set up to sample: eval mode, autocast dtype, optionally a compiled backbone, and on a GPU
    captured CUDA graphs for calls of at most graph_rows sequences (cudagraph.GraphedHidden).

    The latent cache's steps (benchmarks/latent_cache.py; not yet runtime settings): compile_latent compiles them;
    latent_graphs (with graph_rows) pads a partial step's columns to a few widths and, on a GPU, replays the calls
    of at most graph_rows sequences from CUDA graphs (cudagraph.GraphedLatent). The graphs capture the cache by
    address, so this instance then keeps one latent cache per batch shape and hands it out zeroed to each
    new_latent_cache call: one sampler at a time per instance, as the sampler runs.

    cast_weights (benchmarks/sampling.py's latency part; not yet a runtime setting): with an autocast dtype, the
    weights and biases of every Linear but the output head are stored in that dtype once (cast_linear_weights),
    instead of being cast by autocast at every call. This changes the model in place: for models this instance
    alone samples.

    fold_modulation (the same part; not yet a runtime setting): a model without time conditioning computes its
    adaLN modulations once (MDLMDenoiser.fold_modulation), in place too."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None, compile: bool = False,
                 graph_rows: int = 0, compile_latent: bool = False, latent_graphs: bool = False,
                 cast_weights: bool = False, fold_modulation: bool = False) -> None:
        if cast_weights and dtype is not None:
            cast_linear_weights(model, dtype)
        if fold_modulation:
            with autocast(model.device, dtype, cache=False):  # the values a forward computes under this autocast
                model.fold_modulation()
        self.model = model.eval()
        self.config = model.config
        self.device = model.device
        self.dtype = dtype
        # dynamic=True: the number of sequences run changes at every step.
        network = torch.compile(model.hidden, dynamic=True) if compile else model.hidden

        def run(input_ids: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
            # Always without autograd: a compiled graph is specialised on grad mode, so mixing modes recompiles.
            # No cache of the weights' casts: one autocast context per call has nothing to reuse, and a CUDA graph
            # must not capture casts that the cache frees when the context ends.
            with torch.no_grad(), autocast(input_ids.device, dtype, cache=False):
                return network(input_ids, sigma)

        def run_latent(input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor, rows: torch.Tensor,
                       positions: torch.Tensor | None) -> torch.Tensor:
            with torch.no_grad(), autocast(input_ids.device, dtype, cache=False):
                return model.latent_hidden(input_ids, sigma, cache, rows, positions)

        self._hidden = GraphedHidden(run, graph_rows) if graph_rows > 0 and self.device.type == "cuda" else run
        if compile_latent:  # the latent cache's two steps, compiled on this instance (latent_hidden calls them)
            model.latent_refresh = torch.compile(model.latent_refresh, dynamic=True)
            model.latent_partial = torch.compile(model.latent_partial, dynamic=True)
        self._latent = run_latent
        if latent_graphs and graph_rows > 0 and self.config.attention == "mla":
            self._latent = GraphedLatent(run_latent, graph_rows,
                                         lambda length: rotary_cos_sin(length, self.config.rotary_frequencies,
                                                                       self.device))
        self._latent_caches: dict[tuple[int, int], torch.Tensor] = {}  # (B, L) -> the cache the graphs write
        # Compilation and graph capture happen at first calls: a timed run needs an untimed warm-up first.
        self.needs_warm_up = (compile or compile_latent or isinstance(self._hidden, GraphedHidden)
                              or (isinstance(self._latent, GraphedLatent) and self.device.type == "cuda"))

    def prepare_graphs(self, batch_size: int, seq_len: int, latent: bool = False) -> None:
        """Capture the CUDA graphs of every call a sampler of this batch size can make (no-op without graphs);
        latent: those of the latent cache's steps too."""
        if isinstance(self._hidden, GraphedHidden):
            self._hidden.prepare(batch_size, seq_len, self.config.time_conditioning, self.device)
        if latent and isinstance(self._latent, GraphedLatent):
            self._latent.prepare(batch_size, seq_len, self.config.time_conditioning,
                                 self.new_latent_cache(batch_size, seq_len))

    def hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return self._hidden(input_ids, sigma)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_hidden(hidden)

    def new_latent_cache(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """An empty latent cache in the autocast dtype (MDLMDenoiser.new_latent_cache); with latent_graphs, this
        instance's one cache of that shape, zeroed."""
        if not isinstance(self._latent, GraphedLatent):
            return self.model.new_latent_cache(batch_size, seq_len, self.dtype)
        key = (batch_size, seq_len)
        if key not in self._latent_caches:
            self._latent_caches[key] = self.model.new_latent_cache(batch_size, seq_len, self.dtype)
        return self._latent_caches[key].zero_()

    def latent_hidden(self, input_ids: torch.Tensor, sigma: torch.Tensor | None, cache: torch.Tensor,
                      rows: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Through the latent cache (MDLMDenoiser.latent_hidden): eager, compiled with compile_latent, padded and
        graphed with latent_graphs."""
        return self._latent(input_ids, sigma, cache, rows, positions)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def cast_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the weights and biases of every nn.Linear but model.lm_head in dtype, in place (sampling only).

    Under autocast a Linear casts its float32 weight to the autocast dtype at every call: at batch 1 those casts
    are a kernel per Linear and a read of the float32 weights at every forward. Rounding once gives the matmuls the
    same values. The output head stays float32, since the sampler runs it in float32
    (MDLMDenoiser.logits_from_hidden), and so do the norms, which autocast runs in float32.
    """
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(dtype)


@dataclass
class ModelSet:
    """Named denoisers ready to sample, with what every run needs to know about them."""

    models: dict[str, PreparedDenoiser]
    light_to_heavy: list[str]  # names by FLOPs per forward; the last is the all-heavy baseline
    noise: LogLinearNoise
    tokenizer: Any
    seq_len: int
    device: torch.device

    @property
    def needs_warm_up(self) -> bool:
        """Whether a model compiles or captures graphs at its first calls (generate.warm_up before timing)."""
        return any(m.needs_warm_up for m in self.models.values())

    @property
    def config(self) -> DenoiserConfig:
        """The heaviest model's config (compatible with the others' in every field a schedule needs)."""
        return self.models[self.light_to_heavy[-1]].config

    @property
    def configs(self) -> dict[str, DenoiserConfig]:
        return {name: m.config for name, m in self.models.items()}

    def schedule(self, spec: str, steps: int, t_min: float = DEFAULT_T_MIN) -> ModelSchedule:
        """parse_schedule for these models."""
        return parse_schedule(spec, steps, self.light_to_heavy, t_min)


def open_models(paths: Mapping[str, str], runtime: RuntimeConfig, seq_len: int | None = None,
                device: torch.device | None = None) -> ModelSet:
    """Load denoisers by name on the runtime's device (or `device`), refuse an incompatible set, prepare them.

    seq_len: the sampling length (default: the models' max_position_embeddings; at most that).
    """
    device = device if device is not None else resolve_device(runtime)
    configure_backends(device)
    raw = {name: load_denoiser(path, device) for name, path in paths.items()}
    configs = {name: model.config for name, model in raw.items()}
    check_compatible(configs)
    first_name, config = next(iter(configs.items()))
    length = seq_len or config.max_position_embeddings
    check_length(length, config)
    dtype = autocast_dtype(runtime, device)
    return ModelSet(
        models={name: PreparedDenoiser(model, dtype, runtime.compile, runtime.cuda_graph_rows)
                for name, model in raw.items()},
        light_to_heavy=names_light_to_heavy(configs, length),
        noise=make_noise(config.noise_schedule, config.noise_eps),
        tokenizer=load_tokenizer(str(model_folder(local_path(paths[first_name], f"model {first_name}"))),
                                 fix=f"model {first_name!r} must be saved with its tokenizer (training exports it)"),
        seq_len=length,
        device=device,
    )
