"""The sampler: properties on a real tiny MLA denoiser, distribution tests on stand-in predictors,
exact call and FLOPs accounting, the cache and its invalidation when the model changes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mdlm_sched.diffusion import unmask_probability
from mdlm_sched.errors import CheckpointError, SamplingError
from mdlm_sched.flops import forward_flops, trace_flops
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.modelset import check_compatible
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampler import draw_tokens, sample, unmask_steps
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import parse_schedule, time_grid

NOISE = LogLinearNoise(1e-3)


class Counting:
    """Wraps a denoiser; counts network calls, sequences and head positions, keeps every input."""

    def __init__(self, model) -> None:
        self.model, self.config, self.device = model, model.config, torch.device("cpu")
        self.calls, self.rows, self.head_rows, self.inputs, self.flops = 0, 0, 0, [], []

    def hidden(self, input_ids, sigma=None):
        self.calls += 1
        self.rows += input_ids.shape[0]
        self.inputs.append(input_ids.clone())
        self._pending = input_ids.shape
        return self.model.hidden(input_ids, sigma)

    def logits_from_hidden(self, hidden):
        self.head_rows += hidden.shape[0]
        b, l = self._pending
        self.flops.append(forward_flops(self.config, l, b, head_tokens=hidden.shape[0]))
        return self.model.logits_from_hidden(hidden)


class Fixed:
    """Stand-in predictor: the same logits [V] at every position of every sequence, whatever x_t."""

    def __init__(self, probs: list[float], seq_len: int, layers: int = 1) -> None:
        vocab = len(probs) + 1  # + [MASK], the last id
        self.config = DenoiserConfig(vocab_size=vocab, mask_token_id=vocab - 1, max_position_embeddings=seq_len,
                                     hidden_size=8, num_hidden_layers=layers, num_attention_heads=1, kv_lora_rank=4,
                                     qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, intermediate_size=8,
                                     vocab_pad_multiple=1)
        self.device = torch.device("cpu")
        # log-probabilities as float32 logits, and a [MASK] logit that SUBS must ignore
        self.logits = torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs] + [5.0], dtype=torch.float32)

    def hidden(self, input_ids, sigma=None):
        return torch.zeros(*input_ids.shape, 1)

    def logits_from_hidden(self, hidden):
        return self.logits.expand(*hidden.shape[:-1], -1)


@pytest.fixture(scope="module")
def tiny_pair():
    kw = dict(vocab_size=300, mask_token_id=299, max_position_embeddings=32, hidden_size=32, num_attention_heads=2,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
              dropout=0.0)
    torch.manual_seed(0)
    small = MDLMDenoiser(DenoiserConfig(num_hidden_layers=1, **kw)).eval()
    large = MDLMDenoiser(DenoiserConfig(num_hidden_layers=3, **kw)).eval()
    return {"small": small, "large": large}


def run(models, spec="sandwich", steps=40, batch=6, seed=0, prompts=None, **settings):
    names = sorted(models, key=lambda n: models[n].config.num_hidden_layers)
    schedule = parse_schedule(spec, steps, names)
    seq_len = settings.pop("seq_len", 32)
    result = sample(models, schedule, NOISE, SamplerSettings(**settings), torch.Generator().manual_seed(seed),
                    batch, seq_len, prompts)
    return result, schedule


@pytest.mark.parametrize("steps", [1, 7, 32, 200])
def test_no_mask_remains(tiny_pair, steps):
    result, _ = run(tiny_pair, steps=steps)
    assert not (result.tokens == 299).any()
    assert result.tokens.shape == (6, 32)


def test_unmasked_token_never_changes(tiny_pair):
    models = {name: Counting(m) for name, m in tiny_pair.items()}
    result, _ = run(models, steps=50, cache=False)
    states = [x for m in models.values() for x in m.inputs]
    states.sort(key=lambda x: int((x == 299).sum()), reverse=True)  # one input per step, fewer masks later
    states.append(result.tokens)
    for before, after in zip(states, states[1:]):
        fixed = before != 299
        assert torch.equal(after[fixed], before[fixed])
        assert ((after == 299) <= (before == 299)).all()  # a mask can only go, never come back


def test_same_seed_same_output_other_seed_different(tiny_pair):
    a, _ = run(tiny_pair, seed=3)
    b, _ = run(tiny_pair, seed=3)
    c, _ = run(tiny_pair, seed=4)
    assert torch.equal(a.tokens, b.tokens) and a.trace == b.trace
    assert not torch.equal(a.tokens, c.tokens)


def test_prompts_are_preserved(tiny_pair):
    prompts = [[1, 2, 3], [], [7] * 31, [4], [5, 6], [298]]
    result, _ = run(tiny_pair, prompts=prompts)
    for row, prompt in enumerate(prompts):
        assert result.tokens[row, : len(prompt)].tolist() == prompt
    assert not (result.tokens == 299).any()


def test_sequences_of_a_batch_are_independent(tiny_pair):
    base = [[1, 2], [3, 4], [5], []]
    a, _ = run(tiny_pair, batch=4, prompts=base)
    b, _ = run(tiny_pair, batch=4, prompts=[[1, 2], [9, 9, 9, 9, 9, 9], [8, 8], [7]])
    assert torch.equal(a.tokens[0], b.tokens[0])  # other rows changed, row 0 did not
    assert len({tuple(row) for row in a.tokens.tolist()}) == 4


def test_cache_changes_no_token_and_saves_calls(tiny_pair):
    cached_models = {name: Counting(m) for name, m in tiny_pair.items()}
    uncached_models = {name: Counting(m) for name, m in tiny_pair.items()}
    cached, _ = run(cached_models, steps=100)
    uncached, _ = run(uncached_models, steps=100, cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    rows = lambda ms: sum(m.rows for m in ms.values())  # noqa: E731
    assert rows(uncached_models) == 100 * 6
    assert rows(cached_models) < 0.8 * rows(uncached_models)  # L/T = 0.32 tokens per step: most steps idle
    assert sum(r.skipped for r in cached.trace) == 100 * 6 - rows(cached_models)


def test_calls_and_flops_in_the_trace_are_exact(tiny_pair):
    models = {name: Counting(m) for name, m in tiny_pair.items()}
    result, schedule = run(models, spec="L10,H20,L10", steps=40, batch=5)
    trace = result.trace
    for name, m in models.items():
        steps = [r for r in trace if r.model == name and r.run]
        assert m.calls == len(steps)
        assert m.rows == sum(r.run for r in steps)
        assert m.head_rows == sum(r.unmasked for r in steps)
    assert [r.model for r in trace[:40]] == list(schedule.names)
    assert sum(r.unmasked for r in trace) == 5 * 32  # every position decided exactly once
    configs = {name: m.config for name, m in models.items()}
    total = trace_flops(trace, configs, 32)
    counted = [f for m in models.values() for f in m.flops]
    assert total.blocks_only == sum(f.blocks_only for f in counted)
    assert total.full == sum(f.full for f in counted)
    assert total.calls == {name: m.calls for name, m in models.items()}
    assert total.sequences == {name: m.rows for name, m in models.items()}


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_trace_flops_match_the_flop_counter_over_a_whole_run(tiny_pair, time_conditioning):
    # Independent of flops.py: FlopCounterMode sees every matmul the sampler executes (blocks on the
    # sequences run, the head on the decoded positions); the math SDPA backend makes attention visible.
    models = {name: MDLMDenoiser(DenoiserConfig(**{**m.config.to_dict(),
                                                   "time_conditioning": time_conditioning})).eval()
              for name, m in tiny_pair.items()}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result, _ = run(models, spec="L10,H20,L10", steps=40, batch=5)
    total = trace_flops(result.trace, {name: m.config for name, m in models.items()}, 32)
    assert total.full == counter.get_total_flops()  # exact: both count 2 FLOPs per multiply-add of every matmul
    assert total.blocks_only < total.full


def test_the_saving_with_the_head_at_every_position_is_the_share_of_light_calls_times_their_relative_cost(tiny_pair):
    # Without the cache every sequence runs at every step: 10 + 10 of 40 steps are light.
    result, _ = run(tiny_pair, spec="L10,H20,L10", steps=40, batch=5, cache=False)
    configs = {name: m.config for name, m in tiny_pair.items()}
    used = trace_flops(result.trace, configs, 32)
    heavy = trace_flops(result.trace, configs, 32, as_model="large")
    small, large = forward_flops(configs["small"], 32).full, forward_flops(configs["large"], 32).full
    assert 1 - used.head_everywhere / heavy.head_everywhere == pytest.approx(20 / 40 * (1 - small / large))
    assert used.head_everywhere > used.full  # the sampler's head runs on the decoded positions only


def test_schedules_share_random_numbers_so_all_large_cost_is_exact(tiny_pair):
    sandwich, _ = run(tiny_pair, spec="sandwich", steps=40)
    all_large, _ = run(tiny_pair, spec="all-large", steps=40)
    shape = lambda trace: [(r.step, r.run, r.skipped, r.unmasked) for r in trace]  # noqa: E731
    assert shape(sandwich.trace) == shape(all_large.trace)
    configs = {name: m.config for name, m in tiny_pair.items()}
    assert (trace_flops(sandwich.trace, configs, 32, as_model="large").full
            == trace_flops(all_large.trace, configs, 32).full)


def test_cache_is_invalidated_when_the_model_changes():
    # A always predicts token 0, B token 1: any token decided in B's steps from a stale A prediction shows up.
    a, b = Fixed([1.0, 0.0], 64), Fixed([0.0, 1.0], 64)
    result, schedule = run({"a": a, "b": b}, spec="a:30,b:30", steps=60, batch=16, seq_len=64)
    decided = {name: sum(r.unmasked for r in result.trace if r.model == name) for name in ("a", "b")}
    assert decided["a"] > 0 and decided["b"] > 0
    assert int((result.tokens == 0).sum()) == decided["a"]
    assert int((result.tokens == 1).sum()) == decided["b"]


def test_time_conditioned_model_samples(tiny_pair):
    config = DenoiserConfig(**{**tiny_pair["small"].config.to_dict(), "time_conditioning": True})
    torch.manual_seed(1)
    model = MDLMDenoiser(config).eval()
    result, _ = run({"only": model}, spec="all-large", steps=20)
    assert not (result.tokens == 299).any()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(chi2 / 2)))


TAIL = [0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.04, 0.01, 1e-4, 1e-5, 1e-6]


def exact_probs(model: Fixed) -> torch.Tensor:
    return model.logits[:-1].double().softmax(-1)  # what the float32 logits say, [MASK] excluded


def test_draws_follow_the_predicted_distribution_down_to_1e6():
    model = Fixed([p / sum(TAIL) for p in TAIL], seq_len=2000)
    counts = torch.zeros(len(TAIL), dtype=torch.float64)
    for seed in range(8):  # 8 x 1000 x 2000 = 1.6e7 draws: 16 expected for the 1e-6 token
        result, _ = run({"m": model}, spec="all-large", steps=1, batch=1000, seq_len=2000, seed=seed, t_min=0.0)
        counts += torch.bincount(result.tokens.flatten(), minlength=len(TAIL) + 1)[:-1].double()
    probs = exact_probs(model)
    assert counts.sum() == 8 * 1000 * 2000
    assert chi_square_pvalue(counts, probs) > 1e-3
    for token in (-3, -2, -1):  # 1e-4, 1e-5, 1e-6: each within 4 Poisson standard deviations
        expected = float(probs[token] * counts.sum())
        assert abs(float(counts[token]) - expected) < 4 * math.sqrt(expected) + 1, (token, counts[token], expected)


def test_top_p_keeps_the_nucleus_renormalised():
    model = Fixed([0.3, 0.2, 0.15, 0.35], seq_len=1000)
    result, _ = run({"m": model}, spec="all-large", steps=1, batch=400, seq_len=1000, t_min=0.0, top_p=0.6)
    counts = torch.bincount(result.tokens.flatten(), minlength=5)[:4].double()
    assert counts[1] == 0 and counts[2] == 0  # 0.35 + 0.3 >= 0.6: only tokens 3 and 0 remain
    assert chi_square_pvalue(counts, torch.tensor([0.3, 0.0, 0.0, 0.35], dtype=torch.float64) / 0.65) > 1e-3


def test_draw_tokens_is_an_exact_inverse_cdf():
    logits = torch.tensor([[0.5, 0.25, 0.0, 0.25]]).log()
    u = torch.tensor([0.0, 0.49, 0.51, 0.74, 0.76, 0.999], dtype=torch.float64)
    assert draw_tokens(logits.expand(6, -1), u).tolist() == [0, 0, 1, 1, 3, 3]  # token 2 (probability 0) never


def test_uniforms_that_are_not_float64_are_refused():
    # A float32 uniform upcast would pass unnoticed while losing the tail of every draw (2^24 levels).
    logits = torch.zeros(2, 5)
    with pytest.raises(TypeError, match="float64"):
        draw_tokens(logits, torch.tensor([0.1, 0.7]))
    with pytest.raises(TypeError, match="float64"):
        unmask_steps(torch.rand(2, 3), [0.5, 0.5])


def test_a_draw_past_the_end_is_the_last_token_of_nonzero_probability_not_mask():
    # [MASK] is the last id, with probability 0; u = 1 puts the target at the cdf's end, which rounding can too.
    logits = torch.tensor([[1.0, 2.0, 0.5, -math.inf]])
    assert draw_tokens(logits, torch.tensor([1.0], dtype=torch.float64)).tolist() == [2]
    # With top-p the nucleus is {1, 0}: the last token of nonzero probability in its order is 0.
    assert draw_tokens(logits, torch.tensor([1.0], dtype=torch.float64), top_p=0.8).tolist() == [0]


def test_float64_draws_resolve_tokens_of_probability_1e9_over_the_whole_vocabulary():
    # 50,258 ids (GPT-2 + [MASK]): the bulk of the mass first, then 40,000 tokens of 1e-7 and 10,000 of 1e-9, [MASK]
    # last at probability 0. u at the middle of a token's own interval of the cdf must draw that token: in float32
    # the cdf cannot resolve steps of 1e-9 (or 1e-7) after a mass near 1, and other tokens come out.
    vocab = 50258
    probs = np.zeros(vocab)
    probs[1:40001], probs[40001:50001] = 1e-7, 1e-9
    probs[:1] = 1 - probs.sum() - 256 * 1e-5
    probs[50001:50257] = 1e-5
    with np.errstate(divide="ignore"):  # log 0 = -inf for [MASK]
        logits = torch.tensor(np.log(probs), dtype=torch.float32)[None]  # the float32 head the sampler gets
    exact = np.exp(logits.double().numpy()[0] - np.logaddexp.reduce(logits.double().numpy()[0]))
    cdf = np.cumsum(exact)
    probes = np.array([1, 20000, 40000, 40001, 40002, 45000, 50000, 50001, 50256])
    u = torch.tensor((cdf[probes - 1] + cdf[probes]) / 2 / cdf[-1], dtype=torch.float64)
    drawn = draw_tokens(logits.expand(len(probes), -1), u)
    assert drawn.tolist() == probes.tolist()
    assert exact[40001] == pytest.approx(1e-9, rel=1e-5) and exact[-1] == 0


def test_unmask_probability_matches_the_ancestral_update():
    grid = time_grid(10)
    assert grid[0] == 1.0 and grid[-1] == pytest.approx(1e-5) and grid.dtype == np.float64
    t, s = 0.6, 0.5
    expected = (NOISE.alpha(torch.tensor(s)) - NOISE.alpha(torch.tensor(t))) / (1 - NOISE.alpha(torch.tensor(t)))
    assert unmask_probability(NOISE, t, s) == pytest.approx(float(expected))
    assert unmask_probability(NOISE, t, s) == pytest.approx((t - s) / t)  # log-linear: eps cancels
    assert unmask_probability(NOISE, 0.1, 0.0) == pytest.approx(1.0)


def test_unmask_steps_follow_the_first_success_of_the_per_step_decisions():
    # One uniform per position gives the step of its first success among Bernoulli(p_i) decisions:
    # P(step i) = prod_{j < i} (1 - p_j) p_i, and P(never) = prod_j (1 - p_j).
    p = [0.1, 0.0, 0.5, 0.25, 1e-3]
    u = torch.rand((400, 500), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = unmask_steps(u, p)
    assert steps.shape == u.shape and steps.dtype == torch.long
    survival = np.concatenate([[1.0], np.cumprod(1 - np.array(p))])
    expected = np.append(survival[:-1] * np.array(p), survival[-1]) * u.numel()  # steps 0..4, then never (5)
    observed = np.bincount(steps.flatten().numpy(), minlength=6)
    assert observed[1] == 0  # a step of probability 0 never unmasks
    keep = expected > 0
    assert scipy.stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3
    # Inverse CDF: u just above S_i unmasks by step i, u just below stays masked through it.
    s0 = 1 - p[0]
    assert unmask_steps(torch.tensor([s0 + 1e-12, s0 - 1e-12], dtype=torch.float64), p).tolist() == [0, 2]


@pytest.mark.parametrize("kwargs, prompts, fragment", [
    ({"top_p": 0.0}, None, "top_p=0.0 must be in (0, 1]"),
    ({"top_p": 1.5}, None, "top_p=1.5 must be in (0, 1]"),
    ({"seq_len": 64}, None, "sequence length 64 must be in [1, 32]"),
    ({}, [[1] * 32] + [[]] * 5, "prompt 0 has 32 tokens but sequences have 32"),
    ({}, [[]] * 5 + [[300]], "prompt 5 has token id 300 outside the vocabulary"),
    ({}, [[299]] + [[]] * 5, "equal to [MASK]=299"),
    ({}, [[1]], "1 prompts for a batch of 6"),
])
def test_bad_sampler_input(tiny_pair, kwargs, prompts, fragment):
    with pytest.raises(SamplingError) as info:
        run(tiny_pair, prompts=prompts, **kwargs)
    assert fragment in str(info.value)


def test_schedule_naming_a_missing_model_is_refused(tiny_pair):
    schedule = parse_schedule("a:5,b:5", 10, ["a", "b"])
    with pytest.raises(SamplingError, match="uses model 'a'"):
        sample(tiny_pair, schedule, NOISE, SamplerSettings(), torch.Generator(), 2, 32)


@pytest.mark.parametrize("field, value", [
    ("tokenizer_hash", "other"), ("vocab_size", 301), ("mask_token_id", 0), ("max_position_embeddings", 64),
    ("noise_schedule", "cosine"), ("noise_eps", 1e-4), ("time_conditioning", True),
])
def test_incompatible_models_are_refused_by_field(tiny_pair, field, value):
    other = DenoiserConfig(**{**tiny_pair["large"].config.to_dict(), field: value})
    with pytest.raises(CheckpointError) as info:
        check_compatible({"small": tiny_pair["small"].config, "large": other})
    assert f"differ in {field}" in str(info.value)
    check_compatible({"small": tiny_pair["small"].config, "large": tiny_pair["large"].config})


# ----------------------------------------------------------------------------------- the exact chain


class XDependent:
    """Stand-in predictor whose p(x_0 | x_t) depends on x_t: 3 positions, tokens {0, 1, 2}, [MASK] = 3.

    logits[j, v] = base[j, v] + pull * (number of unmasked positions holding v) + left * [x_{j-1} == v].
    hidden() returns these logits; logits_from_hidden is the identity.
    """

    def __init__(self, base: list[list[float]], pull: float, left: float) -> None:
        self.config = DenoiserConfig(vocab_size=4, mask_token_id=3, max_position_embeddings=3, hidden_size=4,
                                     num_hidden_layers=1, num_attention_heads=1, kv_lora_rank=4, qk_nope_head_dim=2,
                                     qk_rope_head_dim=2, v_head_dim=2, intermediate_size=4, vocab_pad_multiple=1)
        self.device = torch.device("cpu")
        self.base, self.pull, self.left = torch.tensor(base, dtype=torch.float64), pull, left

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3, 4] float64 logits of states x [n, 3] (the [MASK] column is -inf)."""
        onehot = torch.nn.functional.one_hot(x, 4).double()[..., :3]  # [n, 3, 3]; a [MASK] is no token
        counts = onehot.sum(dim=1, keepdim=True)  # [n, 1, 3]
        left = torch.cat([torch.zeros_like(onehot[:, :1]), onehot[:, :-1]], dim=1)  # x_{j-1} as one-hot
        out = self.base[None] + self.pull * counts + self.left * left  # [n, 3, 3]
        return torch.cat([out, torch.full_like(out[..., :1], -math.inf)], dim=-1)

    def hidden(self, input_ids, sigma=None):
        return self.logits(input_ids).float()

    def logits_from_hidden(self, hidden):
        return hidden


CHAIN_MODELS = {"a": XDependent([[0.21, 0.0, -0.33], [0.02, 0.41, 0.13], [-0.19, 0.11, 0.29]], pull=0.57, left=0.0),
                "b": XDependent([[0.0, 0.31, 0.04], [0.23, -0.12, 0.0], [0.09, 0.0, 0.26]], pull=-0.41, left=0.87)}


def exact_final_distribution(models, names: list[str], t_min: float) -> dict[tuple[int, ...], float]:
    """The law of the sampler's output by enumeration: each step, every masked position unmasks with probability
    (t - s) / t (log-linear: alpha_s - alpha_t over 1 - alpha_t) and takes a token from the step's model given the
    state before the step; what remains masked after the last step takes the last model's most likely token."""
    times = np.linspace(1.0, t_min, len(names) + 1)
    states = {(3, 3, 3): 1.0}
    for i, name in enumerate(names):
        p = (times[i] - times[i + 1]) / times[i]
        nxt: dict[tuple[int, ...], float] = {}
        for x, px in states.items():
            probs = models[name].logits(torch.tensor([x]))[0].softmax(-1).numpy()  # [3, 4]
            masked = [j for j in range(3) if x[j] == 3]
            for unmask in itertools.product([False, True], repeat=len(masked)):
                chosen = [j for j, u in zip(masked, unmask) if u]
                p_set = p ** len(chosen) * (1 - p) ** (len(masked) - len(chosen))
                for tokens in itertools.product(range(3), repeat=len(chosen)):
                    y = list(x)
                    p_tok = 1.0
                    for j, v in zip(chosen, tokens):
                        y[j], p_tok = v, p_tok * probs[j, v]
                    nxt[tuple(y)] = nxt.get(tuple(y), 0.0) + px * p_set * p_tok
        states = nxt
    final: dict[tuple[int, ...], float] = {}
    for x, px in states.items():
        logits = models[names[-1]].logits(torch.tensor([x]))[0]  # [3, 4]
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "a tie: the most likely token would depend on rounding"
        best = logits.argmax(-1).tolist()
        y = tuple(best[j] if x[j] == 3 else x[j] for j in range(3))
        final[y] = final.get(y, 0.0) + px
    return final


@pytest.mark.parametrize("cache", [True, False])
def test_the_whole_chain_follows_its_exact_distribution(cache):
    # T = 3 steps of two models (a, then b twice), t_min = 0.2 so that masks can remain for the noise removal.
    names, t_min = ["a", "b", "b"], 0.2
    exact = exact_final_distribution(CHAIN_MODELS, names, t_min)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12) and len(exact) == 27
    schedule = parse_schedule("a:1,b:2", 3, ["a", "b"])
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(3):  # 3 x 40,000 sequences, each independent of the others
        tokens = sample(CHAIN_MODELS, schedule, NOISE, SamplerSettings(cache=cache, t_min=t_min),
                        torch.Generator().manual_seed(seed), 40_000, 3).tokens
        for row, n in zip(*np.unique(tokens.numpy(), axis=0, return_counts=True)):
            counts[tuple(row.tolist())] = counts.get(tuple(row.tolist()), 0) + int(n)
    assert set(counts) <= set(exact)  # never a [MASK], never a sequence the chain cannot make
    keys = sorted(exact)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=np.float64)
    expected = np.array([exact[k] for k in keys]) * observed.sum()
    assert expected.min() > 50  # every cell well filled: the chi-square approximation holds
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
