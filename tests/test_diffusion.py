"""MDLM maths of mdlm_sched.noise and mdlm_sched.diffusion, checked against independent formulas.

Reference facts (log-linear schedule, eps = 1e-3): alpha(t) = 1 - (1 - eps) t, sigma(t) = -log alpha(t),
P(masked at t) = (1 - eps) t, NELBO weight -alpha'(t) / (1 - alpha(t)) = 1/t; t = 1 fully masked,
t = 0 clean. SUBS: [MASK] gets zero probability, unmasked positions copy their input (carry-over).
"""

from __future__ import annotations

import math

import pytest
import torch

from mdlm_sched.diffusion import corrupt, masked_nll, masked_positions, nelbo_terms, sample_times
from mdlm_sched.noise import LogLinearNoise, make_noise

EPS = 1e-3
NOISE = LogLinearNoise(eps=EPS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_nll64(logits: torch.Tensor, x0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Independent float64 -log softmax(logits without the [MASK] column)[x0], [B, L]."""
    keep = [v for v in range(logits.shape[-1]) if v != mask_id]
    sub = logits.double()[..., keep]
    log_z = torch.logsumexp(sub, dim=-1)
    return log_z - logits.double().gather(-1, x0[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------------------- noise


def test_loglinear_endpoints_and_sigma() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha = NOISE.alpha(t)
    assert alpha[0].item() == 1.0
    assert alpha[-1].item() == pytest.approx(EPS, rel=1e-12)
    torch.testing.assert_close(alpha, 1 - (1 - EPS) * t, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.exp(-NOISE.sigma(t)), alpha, rtol=1e-12, atol=1e-15)
    assert NOISE.sigma(torch.tensor(0.0, dtype=torch.float64)).item() == 0.0
    assert NOISE.sigma(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(-math.log(EPS), rel=1e-12)
    # sigma increases with t (more noise later)
    assert (NOISE.sigma(t).diff() > 0).all()
    assert make_noise("loglinear", 0.05) == LogLinearNoise(eps=0.05)


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_loss_weight_is_one_over_t_and_matches_autograd(eps: float) -> None:
    noise = LogLinearNoise(eps=eps)
    t = torch.linspace(1e-3, 1.0, 257, dtype=torch.float64, requires_grad=True)
    alpha = noise.alpha(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)  # elementwise: d alpha_i / d t_i
    t = t.detach()
    expected = -d_alpha / (1 - noise.alpha(t))
    weight = noise.loss_weight(t)
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(weight, 1 / t, rtol=1e-12, atol=0)
    # the same weight from sigma: w = sigma' exp(-sigma) / (1 - exp(-sigma))
    t_req = t.clone().requires_grad_(True)
    (d_sigma,) = torch.autograd.grad(noise.sigma(t_req).sum(), t_req)
    sigma = noise.sigma(t)
    torch.testing.assert_close(weight, d_sigma * torch.exp(-sigma) / -torch.expm1(-sigma), rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------ sample_times


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_sample_times_low_discrepancy(seed: int, batch_size: int) -> None:
    sampling_eps = 1e-3
    t = sample_times(batch_size, gen(seed), sampling_eps=sampling_eps)
    assert t.shape == (batch_size,)
    assert t.dtype == torch.float32
    assert (t >= sampling_eps).all() and (t <= 1).all()
    gaps = t.sort().values.double().diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - sampling_eps) / batch_size), rtol=0, atol=1e-6)
    # same seed -> same times; a different seed -> a different offset
    torch.testing.assert_close(sample_times(batch_size, gen(seed), sampling_eps=sampling_eps), t, rtol=0, atol=0)
    assert not torch.equal(sample_times(batch_size, gen(seed + 1), sampling_eps=sampling_eps), t)


def test_sample_times_offset_is_uniform() -> None:
    """Across seeds the smallest time (the offset) covers [sampling_eps, sampling_eps + (1 - eps)/B) evenly."""
    batch_size, sampling_eps = 8, 0.01
    width = (1 - sampling_eps) / batch_size
    lows = torch.stack([sample_times(batch_size, gen(s), sampling_eps=sampling_eps).min() for s in range(2000)])
    u = (lows.double() - sampling_eps) / width  # should be U[0, 1)
    assert (u >= -1e-6).all() and (u < 1 + 1e-6).all()
    # mean of U[0,1) over 2000 draws: sd = sqrt(1/12/2000) ~ 0.0065; 5 sd
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 2000)
    counts = torch.histc(u.float(), bins=4, min=0, max=1)
    assert counts.min() > 400  # expected 500 per quarter, sd ~ 19


# ------------------------------------------------------------------------------------------- corrupt


def test_corrupt_keeps_unmasked_tokens_and_uses_per_row_times() -> None:
    mask_id, vocab = 99, 99
    x0 = torch.randint(0, vocab, (6, 2048), generator=gen(0))
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    xt = corrupt(x0, t, NOISE, mask_id, gen(1))
    assert xt.shape == x0.shape and xt.dtype == x0.dtype
    kept = xt != mask_id
    assert torch.equal(xt[kept], x0[kept])
    assert set(xt.unique().tolist()) <= set(x0.unique().tolist()) | {mask_id}
    frac = (~kept).double().mean(dim=1)
    assert frac[0].item() == 0.0  # t = 0 is clean
    assert (frac.diff() > 0).all()  # rows keep their own t
    # same generator seed -> same corruption
    assert torch.equal(corrupt(x0, t, NOISE, mask_id, gen(1)), xt)


@pytest.mark.parametrize("t_value", [0.05, 0.25, 0.5, 0.75, 0.95])
def test_corrupt_masked_fraction(t_value: float) -> None:
    mask_id = 50257
    x0 = torch.randint(0, 50257, (64, 4096), generator=gen(3))
    t = torch.full((64,), t_value)
    xt = corrupt(x0, t, NOISE, mask_id, gen(int(t_value * 1000)))
    n = x0.numel()
    p = (1 - EPS) * t_value
    frac = (xt == mask_id).double().mean().item()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 5 * se, (frac, p, se)


def test_corrupt_extremes() -> None:
    mask_id = 7
    x0 = torch.randint(0, 7, (64, 4096), generator=gen(5))
    n = x0.numel()
    # t near 0: P(masked) = (1 - eps) 1e-4, about 26 of 262144 tokens
    masked = (corrupt(x0, torch.full((64,), 1e-4), NOISE, mask_id, gen(6)) == mask_id).sum().item()
    expected = (1 - EPS) * 1e-4 * n
    assert abs(masked - expected) < 5 * math.sqrt(expected) + 1
    # t = 1: all but ~eps of the tokens are masked (about 262 stay clean)
    clean = (corrupt(x0, torch.ones(64), NOISE, mask_id, gen(7)) != mask_id).sum().item()
    expected = EPS * n
    assert abs(clean - expected) < 5 * math.sqrt(expected)
    assert (corrupt(x0, torch.zeros(64), NOISE, mask_id, gen(8)) == x0).all()


# ------------------------------------------------------------------------------- NLL and NELBO (SUBS)


def _batch(seed: int, vocab: int = 41, mask_id: int = 40, shape: tuple[int, int] = (8, 96)):
    g = gen(seed)
    logits = 2 * torch.randn(*shape, vocab, generator=g)
    x0 = torch.randint(0, mask_id, shape, generator=g)
    t = sample_times(shape[0], g)
    xt = corrupt(x0, t, NOISE, mask_id, g)
    return logits, x0, xt, t, mask_id


def test_masked_nll_matches_float64_reference() -> None:
    logits, x0, _, _, mask_id = _batch(21)
    logits[..., mask_id] = 15.0  # must be excluded from the normaliser
    before = logits.clone()
    nll = masked_nll(logits, x0, mask_id)
    assert torch.equal(logits, before)
    assert nll.shape == x0.shape
    # masked_nll is documented as the NLL at every position; the caller keeps the masked ones
    torch.testing.assert_close(nll.double(), ref_nll64(logits, x0, mask_id), rtol=1e-5, atol=1e-5)


def test_masked_positions_are_the_mask_tokens_in_order() -> None:
    _, _, xt, _, mask_id = _batch(24)
    positions = masked_positions(xt, mask_id)
    flat = xt.flatten()
    assert (flat[positions] == mask_id).all()
    assert int((flat == mask_id).sum()) == len(positions)
    assert (positions.diff() > 0).all()


def _terms(head: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, positions: torch.Tensor,
           mask_id: int) -> torch.Tensor:
    """NELBO terms [M] from the head's logits [M, V] at positions [M], as the objective computes them."""
    return nelbo_terms(masked_nll(head, x0.flatten()[positions], mask_id), t, positions, x0.shape[1], NOISE)


def test_nelbo_terms_matches_float64_reference() -> None:
    logits, x0, xt, t, mask_id = _batch(22)
    masked = xt == mask_id
    assert masked.any() and (~masked).any()
    positions = masked_positions(xt, mask_id)
    terms = _terms(logits.flatten(0, 1)[positions], x0, t, positions, mask_id)
    assert terms.shape == positions.shape
    ref = (1 / t.double())[:, None] * ref_nll64(logits, x0, mask_id)  # [B, L]
    torch.testing.assert_close(terms.double(), ref[masked], rtol=1e-5, atol=1e-5)  # masked in row-major order
    assert (terms > 0).all()


def test_nelbo_gradients_are_finite_and_skip_mask_column() -> None:
    logits, x0, xt, t, mask_id = _batch(23)
    positions = masked_positions(xt, mask_id)
    head = logits.flatten(0, 1)[positions].requires_grad_(True)
    _terms(head, x0, t, positions, mask_id).sum().backward()
    grad = head.grad
    assert torch.isfinite(grad).all()
    assert (grad[:, mask_id] == 0).all()  # the -inf [MASK] logit gets no gradient
    assert (grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("sampling_eps", [1e-3, 0.5])
def test_masked_fraction_is_the_share_masked_in_training(sampling_eps: float) -> None:
    """E[(1 - eps) t], t ~ U[sampling_eps, 1]: 0.5 at the defaults, 0.75 when t starts at 0.5. With 1024 strata
    the times' mean is within 1/2048 of its expectation; the masking draws add sd sqrt(sum p(1-p)) / N."""
    batch, length = 1024, 256
    g = gen(41)
    t = sample_times(batch, g, sampling_eps)
    xt = corrupt(torch.zeros(batch, length, dtype=torch.long), t, NOISE, 1, g)
    share = float((xt == 1).double().mean())
    p = (1 - EPS) * t.double()
    sd = math.sqrt(float((length * p * (1 - p)).sum())) / (batch * length)
    expected = NOISE.masked_fraction(sampling_eps)
    assert abs(share - expected) < 5 * sd + 1 / (2 * batch), (share, expected, sd)


def test_uniform_predictor_nelbo_is_one_minus_eps_log_v_minus_1() -> None:
    """All-zero logits over V: every masked token costs log(V - 1), so E[NELBO per token] = (1 - eps) log(V - 1).

    Given t, a token contributes X = (1/t) log(V-1) B with B ~ Bernoulli(p = (1 - eps) t), so
    E[X | t] = (1 - eps) log(V-1) for every t: the expectation is exact whatever times are drawn and only
    the masking draws vary, Var[X | t] = log(V-1)^2 (1 - eps) (1 - (1 - eps) t) / t. The mean over N = B*L
    tokens therefore has sd = log(V-1) sqrt((1 - eps) sum_b L (1 - (1 - eps) t_b) / t_b) / N, computed from
    the drawn times; the test allows 5 sd (plus 1e-4 for float32 rounding).
    """
    vocab, mask_id = 64, 63
    batch, length = 64, 2048
    g = gen(31)
    x0 = torch.randint(0, mask_id, (batch, length), generator=g)
    t = sample_times(batch, g)
    xt = corrupt(x0, t, NOISE, mask_id, g)
    positions = masked_positions(xt, mask_id)
    terms = _terms(torch.zeros(len(positions), vocab), x0, t, positions, mask_id)
    mean = terms.double().sum().item() / x0.numel()

    log_v = math.log(vocab - 1)
    target = (1 - EPS) * log_v
    td = t.double()
    n = batch * length
    sd = log_v * math.sqrt((1 - EPS) * (length * (1 - (1 - EPS) * td) / td).sum().item()) / n
    assert sd < 0.02 * target  # the check is not vacuous
    assert abs(mean - target) < 5 * sd + 1e-4, (mean, target, sd)
    # per masked token the cost is exactly log(V-1) / t
    torch.testing.assert_close(terms, log_v / t[positions // length], rtol=1e-6, atol=0)
