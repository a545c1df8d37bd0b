"""Shared fixtures: paths to ../shared/data and tiny model configs."""

from __future__ import annotations

from pathlib import Path

import pytest

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
