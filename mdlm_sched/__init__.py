"""mdlm-sched: model scheduling for faster sampling from masked diffusion language models."""

__version__ = "0.1.0"
