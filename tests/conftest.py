"""Shared fixtures: paths to ../shared/data and tiny model configs."""

from __future__ import annotations

import os
from pathlib import Path

# One thread per test process (read by torch when it is first imported, and inherited by the processes tests
# start): pytest runs two workers side by side on a two-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402  (after the thread setting)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER = SHARED_DATA / "gpt2-tokenizer"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read real data from ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture()
def tiny_denoiser_kwargs() -> dict:
    """DenoiserConfig kwargs of a very small model (random weights; vocabulary 300)."""
    return dict(vocab_size=300, mask_token_id=299, max_position_embeddings=32, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                intermediate_size=256, dropout=0.0)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Tiny small (2 blocks) and large (4 blocks) MDLMs and a tiny GPT-2 judge, each trained 12 steps on owt_tiny.

    Also "cache": the tokenised-data cache they used. Trained once per test session.
    """
    from mdlm_sched.config_load import load
    from mdlm_sched.train import train

    root = tmp_path_factory.mktemp("trained_tiny")
    paths = {"cache": root / "cache"}
    for name, preset in (("small", "tiny"), ("large", "tiny_large"), ("judge", "judge_tiny")):
        train(load([f"model={preset}", "data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"data.root={shared_data}",
                    f"data.cache_dir={paths['cache']}", "data.seq_len=64", "train.steps=12", "train.warmup_steps=4",
                    "train.val_every=12", "train.ckpt_every=12", "train.val_batches=1",
                    f"train.out_dir={root / name}"]), progress=False)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Randomly initialised tiny (2 blocks) and tiny_large (4 blocks) models in the HF layout, plus misfits."""
    import torch

    from mdlm_sched.checkpoint import export_model
    from mdlm_sched.config_load import load
    from mdlm_sched.data import load_tokenizer, tokenizer_hash
    from mdlm_sched.models import build_model

    root = tmp_path_factory.mktemp("models")
    tok = load_tokenizer(str(TOKENIZER))
    paths = {}
    for name, words in {"small": ["model=tiny"], "large": ["model=tiny_large"],
                        "short": ["model=tiny", "model.max_seq_len=64", "data.seq_len=64"],
                        "judge": ["model=judge_tiny"]}.items():
        torch.manual_seed(0)
        cfg = load(["data=owt_tiny", f"data.root={shared_data}", f"data.cache_dir={root / 'cache'}", *words])
        export_model(build_model(cfg, len(tok), tok.eos_token_id, tokenizer_hash(tok)), tok, root / name)
        paths[name] = root / name
    return paths
