"""benchmarks/transmla.py on a CPU at tiny sizes, so that the script cannot rot: a DiT source trained, converted to
MLA at three latent ranks, each fine-tuned, sampled, the from-scratch controls trained, then the report; its figures
come from the GPU."""

from __future__ import annotations

import json

from conftest import SHARED_DATA
from test_benchmark_smoke import run_benchmark

# A DiT source of 2 blocks x 64 (2 heads of 32, so 128 K/V elements per token and block) and MLA runs of that width.
TRANSMLA_TINY = ["data=owt", f"data.root={SHARED_DATA}", "data.max_docs=300", "runtime=cpu",
                 "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                 "model.cond_dim=16", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
                 "model.v_head_dim=16", "model.max_seq_len=64", "data.seq_len=64", "train.batch_size=4",
                 "train.micro_batch_size=4", "train.log_every=2", "train.val_batches=1"]


def test_the_transmla_benchmark_converts_tunes_samples_and_reports(tmp_path):
    runs, report = tmp_path / "runs", tmp_path / "report"
    run_benchmark("transmla.py", "run", "--data-root", str(SHARED_DATA), "--out", str(runs), "--source-steps", "6",
                  "--tune-share", "0.5", "--ranks", "48", "32", "16", "--device", "cpu", "--sample-batch", "2",
                  "--override", *TRANSMLA_TINY)
    results = json.loads((runs / "results.json").read_text())
    assert {"source", "scratch", "heads128", "sampling_source", "sampling_converted"} <= set(results)
    for rank in (48, 32, 16):
        assert results[f"convert{rank}"]["kv_source"] == 128
        assert results[f"convert{rank}"]["kv_converted"] == rank + 32  # latent + the rotary key of ROPE = 32
        assert results[f"tuned{rank}"]["tokens_seen"] == 3 * 4 * 64  # 3 steps (half of 6) of 4 x 64 tokens
    assert results["source"]["shape"] == "2 x 64" and results["source"]["device"] == "cpu"
    run_benchmark("transmla.py", "report", str(runs), "--out", str(report))
    table = (report / "table.md").read_text()
    assert "| source DiT (MHA, 2 x 64) | 128 |" in table
    assert "| converted, latent 16 + rotary 32 | 48 |" in table
    assert (report / "bound_vs_latent.png").stat().st_size > 0
