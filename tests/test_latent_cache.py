"""The latent cache (latent_cache.py): absorbed attention equals the expanded form, refresh at every step is exact
sampling, a step recomputes exactly the positions that unmask or changed, its FLOPs are what it executes, and the
cache holds what the latent sizes say."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mdlm_sched.errors import SamplingError
from mdlm_sched.flops import trace_flops
from mdlm_sched.latent_cache import plan_latent_steps
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampler import sample
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import parse_schedule

from conftest import REPO

L = 32


def _model(layers: int, **overrides) -> MDLMDenoiser:
    kw = dict(vocab_size=300, mask_token_id=299, max_position_embeddings=L, hidden_size=64, num_hidden_layers=layers,
              num_attention_heads=4, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
              intermediate_size=128, dropout=0.0, ada_ln=True)
    model = MDLMDenoiser(DenoiserConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():  # the gates and the head start at zero: give them weights, so that context matters
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def pair() -> dict[str, MDLMDenoiser]:
    torch.manual_seed(0)
    return {"small": _model(1), "large": _model(2)}


def _sample(models, spec="sandwich", steps=40, batch=4, prompts=None, **settings):
    schedule = parse_schedule(spec, steps, ["small", "large"])
    return sample(models, schedule, LogLinearNoise(1e-3), SamplerSettings(**settings), torch.Generator().manual_seed(3),
                  batch, L, prompts)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 16}, {"kv_norm": False}, {"ada_ln": False},
                                       {"time_conditioning": True}])
def test_absorbed_attention_over_fresh_latents_equals_the_full_forward(overrides):
    torch.manual_seed(1)
    model = _model(2, **overrides)
    x = torch.randint(0, 299, (3, L))
    sigma = torch.rand(3) if model.config.time_conditioning else None
    rows = torch.tensor([4, 0, 2])  # rows of a batch of 5
    positions = torch.tensor([[3, 7, 7], [0, 31, 5], [10, 11, 12]])  # a column twice in a row: padding
    with torch.no_grad():
        exact = model.hidden(x, sigma)
        cache = model.new_latent_cache(5, L)
        assert torch.equal(model.latent_hidden(x, sigma, cache, rows, None), exact)  # a refresh: the same numbers
        part = model.latent_hidden(x, sigma, cache, rows, positions)
    want = exact.gather(1, positions[..., None].expand(-1, -1, exact.shape[-1]))
    torch.testing.assert_close(part, want, rtol=1e-5, atol=1e-5)
    assert cache.shape == (2, 5, L, 24 + 8) and model.config.kv_cache_elements == 32  # layers, B, L, r + rope
    assert cache.nbytes == 2 * 5 * L * 32 * 4 and not cache[:, [1, 3]].any()  # rows not run hold nothing


@pytest.mark.parametrize("spec", ["all-large", "sandwich", "L10,H20,L10"])
def test_refresh_at_every_step_samples_the_exact_tokens(pair, spec):
    for extra in ({}, {"top_p": 0.9}):
        exact = _sample(pair, spec, **extra)
        cached = _sample(pair, spec, latent_cache=True, latent_refresh_every=1, **extra)
        assert torch.equal(cached.tokens, exact.tokens)
    prompts = [[5, 6, 7], [8], [9, 10], []]
    assert torch.equal(_sample(pair, spec, prompts=prompts, latent_cache=True, latent_refresh_every=1).tokens,
                       _sample(pair, spec, prompts=prompts).tokens)


def test_without_refreshes_the_cache_runs_fewer_positions_and_stays_close(pair):
    # Stale latents move the logits a little; the same uniforms then mostly draw the same tokens (a wrong slot
    # or position would draw unrelated ones).
    exact = _sample(pair, "all-large", steps=64, batch=6)
    cached = _sample(pair, "all-large", steps=64, batch=6, latent_cache=True, latent_refresh_every=0,
                     latent_refresh_share=1.0)
    run_exact = sum(r.run * L for r in exact.trace)
    run_cached = sum(r.positions_run for r in cached.trace)
    assert run_cached < run_exact / 2
    assert not (cached.tokens == 299).any() and (cached.tokens == exact.tokens).float().mean() > 0.9


def test_the_plan_recomputes_the_unmasking_and_the_changed_positions_and_refreshes_on_takeover():
    # One sequence of 6 positions: the step at which each unmasks (none at step 2).
    steps = np.array([[0, 1, 1, 3, 4, 5]])
    names = ["small", "small", "small", "small", "large", "large"]
    plan = plan_latent_steps(steps, names, refresh_every=0, refresh_share=1.0, device=torch.device("cpu"))
    assert [len(p.refresh) for p in plan] == [1, 0, 0, 0, 1, 0]  # first use of each model: a refresh
    assert plan[1].positions.tolist() == [[1, 2, 0]]  # decoded at step 1 first, then position 0 (changed at 0)
    assert plan[2].sequences == 0 and plan[2].positions_run == 0  # nothing unmasks at step 2: no network
    assert plan[3].positions.tolist() == [[3, 1, 2]]  # 1 and 2 changed at step 1, not recomputed since
    assert plan[5].positions.tolist() == [[5, 4]]  # only position 4 changed since large's refresh at step 4
    assert plan[4].positions_run == 6 and plan[1].take.tolist() == [0, 1]
    every2 = plan_latent_steps(steps, ["small"] * 6, refresh_every=2, refresh_share=1.0, device=torch.device("cpu"))
    assert [len(p.refresh) for p in every2] == [1, 0, 0, 1, 0, 1]  # steps 0, 3 (>= 2 after 0), 5 (>= 2 after 3)
    share = plan_latent_steps(steps, ["small"] * 6, refresh_every=0, refresh_share=0.3, device=torch.device("cpu"))
    assert [len(p.refresh) for p in share] == [1, 0, 0, 1, 0, 0]  # 2 of 6 changed since cached by step 3


def test_latent_cached_flops_are_what_the_run_executes(pair):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = _sample(pair, "L10,H20,L10", steps=40, batch=5, latent_cache=True, latent_refresh_every=4)
    total = trace_flops(result.trace, {name: m.config for name, m in pair.items()}, L)
    assert total.full == counter.get_total_flops()
    exact = trace_flops(_sample(pair, "L10,H20,L10", steps=40, batch=5).trace,
                        {name: m.config for name, m in pair.items()}, L)
    assert total.blocks_only < exact.blocks_only


def test_bad_latent_cache_settings_are_refused(pair):
    with pytest.raises(SamplingError, match="needs cache: true"):
        SamplerSettings(latent_cache=True, cache=False)
    with pytest.raises(SamplingError, match="latent_refresh_share"):
        SamplerSettings(latent_refresh_share=1.5)
    mha = {"small": _model(1, attention="mha", num_key_value_heads=4), "large": _model(2, attention="mha")}
    with pytest.raises(SamplingError, match="needs MLA models"):
        _sample(mha, latent_cache=True)


def test_the_speed_benchmark_runs_on_the_cpu(tmp_path):
    # benchmarks/latent_cache.py at tiny widths, so that it cannot rot; through PreparedDenoiser, R1 is exact.
    # --graphed: on a CPU, the padded calls of cudagraph.GraphedLatent without the graphs; --fold: the cached steps
    # through folded modulations too.
    out = tmp_path / "new" / "speed.json"  # its folder is made by the write
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_cache.py"), "--smoke", "--graphed",
                          "--fold", "--schedules", "sandwich", "--settings", "exact", "R1", "R0", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = {r["setting"]: r for r in record["rows"]}
    assert record["graphed"] and record["fold"] and rows["R1"]["same_tokens_as_exact"] == 1.0
    assert rows["R1"]["positions_run_per_seed"] == rows["exact"]["positions_run_per_seed"]  # every step a refresh
    assert rows["R0"]["positions_run_per_seed"] < rows["exact"]["positions_run_per_seed"] / 2
    assert rows["R0"]["flops_full_per_seed"] < rows["exact"]["flops_full_per_seed"]


def test_the_call_times_predict_from_each_step_of_the_plan(tmp_path):
    # --call-times: each call kind timed alone, then each setting's network time as the sum over its plan's calls.
    out = tmp_path / "calls.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_cache.py"), "--smoke", "--call-times",
                          "--schedules", "all-large", "--settings", "R1", "R0", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text())
    ms = {(c["model"], c["call"]): c["ms_median"] for c in record["calls"]}
    assert all(t > 0 for t in ms.values()) and ("large", "refresh") in ms
    rows = {r["setting"]: r for r in record["predictions"]}
    assert rows["R1"]["refreshes"] == rows["R1"]["network_calls"] > rows["R0"]["refreshes"] >= 1
    # all-large at B = 1: exact sampling runs one large forward at each step that runs the network
    assert rows["R0"]["exact_network_s"] == pytest.approx(rows["R0"]["network_calls"] * ms[("large", "forward")] / 1e3)
    assert rows["R1"]["cached_network_s"] == pytest.approx(rows["R1"]["network_calls"] * ms[("large", "refresh")] / 1e3)
    assert [r["setting"] for r in record["rows"]] == ["R1", "R0"]  # then the timed batches, on the same models


def test_the_drift_benchmark_groups_the_cache_error_by_age(tmp_path, saved_models):
    # benchmarks/latent_drift.py --smoke: teacher-forced exact trajectories, each step also through the cache.
    out = tmp_path / "drift.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_drift.py"), "--smoke", "--settings", "R1",
                          "R4", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    settings = json.loads(out.read_text())["settings"]
    assert [r["age"] for r in settings["R1"]] == [0] and [r["age"] for r in settings["R4"]] == [0, 1, 2, 3]
    # a refresh at every step is the exact forward up to rounding; older caches drift, here by tiny amounts
    assert settings["R1"][0]["kl"] < 1e-15 and settings["R1"][0]["top1_agreement"] == 1.0
    assert all(r["kl"] > 1e3 * max(settings["R1"][0]["kl"], 1e-18) for r in settings["R4"][1:])
    assert sum(r["positions"] for r in settings["R4"]) == settings["R1"][0]["positions"]  # every decoded position
    for words, fragment in ((["--settings", "R0"], "R<n>"), (["--steps", "0"], "--steps")):
        bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_drift.py"), "--smoke", *words],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and fragment in bad.stderr
    # saved models, as a pipeline's train/<name> folders are read: the heaviest is measured by default
    saved = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_drift.py"), "--models",
                            f"small={saved_models['small']}", f"large={saved_models['large']}", "--steps", "8",
                            "--samples", "2", "--batch", "2", "--settings", "R2", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0, saved.stderr[-2000:]
    assert [r["age"] for r in json.loads(out.read_text())["settings"]["R2"]] == [0, 1]


def test_the_warm_up_before_timing_runs_the_latent_cache_too(saved_models, monkeypatch):
    # A compiled sweep warms up before it times; with latent_cache on it once asked for latent_cache without cache.
    from mdlm_sched.config import RuntimeConfig
    from mdlm_sched.generate import warm_up
    from mdlm_sched.modelset import PreparedDenoiser, open_models

    model_set = open_models({n: str(saved_models[n]) for n in ("small", "large")}, RuntimeConfig(device="cpu"),
                            seq_len=L)
    calls = []
    real = PreparedDenoiser.latent_hidden
    monkeypatch.setattr(PreparedDenoiser, "latent_hidden", lambda self, *a: calls.append(1) or real(self, *a))
    warm_up(model_set, SamplerSettings(), batch_size=3, steps=4)
    assert not calls
    warm_up(model_set, SamplerSettings(latent_cache=True, latent_refresh_every=2), batch_size=3, steps=4)
    assert calls  # the cached path itself ran


def test_each_cached_step_compiles_as_one_graph(pair):
    # fullgraph: a graph break fails the trace (the rotary tables' host values once broke it, and the blocks then
    # recompiled layer by layer). The eager backend traces as inductor would, without its code generation.
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = {"small": _model(1), "large": _model(2)}  # pair's weights, on models of their own
    for model in models.values():
        model.latent_refresh = torch.compile(model.latent_refresh, backend="eager", fullgraph=True, dynamic=True)
        model.latent_partial = torch.compile(model.latent_partial, backend="eager", fullgraph=True, dynamic=True)
    for spec in ("sandwich", "all-large"):
        compiled = _sample(models, spec, latent_cache=True, latent_refresh_every=4)
        assert torch.equal(compiled.tokens, _sample(pair, spec, latent_cache=True, latent_refresh_every=4).tokens)
    torch._dynamo.reset()


def test_the_operator_count_runs_on_the_cpu(tmp_path):
    # benchmarks/latent_cache.py --op-count: operators per eager call under bf16 autocast, so that it cannot rot.
    out = tmp_path / "ops.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_cache.py"), "--op-count", "--smoke",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ops = {(r["call"], r["cast_weights"], r["fold_modulation"]): r["operators"]
           for r in json.loads(out.read_text())["rows"]}
    for call in ("forward", "refresh", "partial A=4"):
        # casting once drops the per-call casts of the weights; folding, the time embedding and adaLN matmuls
        assert 0 < ops[(call, True, True)] < ops[(call, True, False)] < ops[(call, False, False)]
    # a partial step's operators do not depend on how many columns it runs
    assert ops[("partial A=4", False, False)] == ops[("partial A=16", False, False)] == ops[("partial A=64", False,
                                                                                              False)]


def test_the_benchmark_refuses_an_output_it_cannot_write_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "latent_cache.py"), "--op-count", "--smoke",
                          "--out", str(blocker / "ops.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.startswith("latent_cache: ") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stdout == ""  # refused before the first call was counted
