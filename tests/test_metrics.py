"""Gen PPL under a judge saved to disk: golden values counted by hand (a uniform judge) and from an independent
computation, the token rules (MDLM's, first-EOS, every token), entropy, MAUVE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mdlm_sched.data import load_tokenizer
from mdlm_sched.errors import CheckpointError
from mdlm_sched.metrics import (entropy_summary, first_eos_cut, generative_perplexity, judge_features,
                                load_judge, mauve_scores, to_judge_tokens, unigram_entropy)

from conftest import TOKENIZER

EOS = 50256
TEXT_A = "The committee met on Tuesday to discuss the budget, and the mayor said the plan would go ahead."
TEXT_B = " A second document starts here and must not be scored."


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tokenizer):
    """A tiny randomly initialised GPT-2 judge with the real GPT-2 tokenizer, saved in the HF layout."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def independent_nll(model: torch.nn.Module, ids: list[int], context: int) -> list[tuple[int, int, float]]:
    """(position in the sample, token, -log p(token | the chunk's tokens before it)) of every target, each chunk of
    `context` tokens run alone; log-softmax in float64 numpy."""
    out = []
    for start in range(0, len(ids), context):
        chunk = ids[start:start + context]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double().numpy()  # [n, V]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        out += [(start + i + 1, chunk[i + 1], -log_probs[i, chunk[i + 1]]) for i in range(len(chunk) - 1)]
    return out


def test_golden_gen_ppl_equals_an_independent_computation(judge_dir, tokenizer):
    judge = load_judge(str(judge_dir), context=16)  # 16-token chunks: each document spans several
    a, b = tokenizer.encode(TEXT_A), tokenizer.encode(TEXT_B)
    sample = [EOS, *a, EOS, *b]  # [BOS] document [EOS] next document
    result = generative_perplexity([sample], tokenizer, judge, batch_size=3)
    targets = independent_nll(judge.model, sample, 16)
    # MDLM's rule: every target that is not EOS (chunk 0 holds [BOS], so no chunk's first EOS is a target but
    # the one ending document a, if it opens no chunk: it is the second EOS of its chunk or a chunk's first)
    eos_at = len(a) + 1
    first_of_its_chunk = eos_at % 16 != 0 and eos_at >= 16
    mdlm = [(pos, nll) for pos, tok, nll in targets if tok != EOS or (pos == eos_at and first_of_its_chunk)]
    first_eos = [(pos, nll) for pos, tok, nll in targets if pos <= eos_at]  # the first document and its EOS
    for rule, kept in (("mdlm", mdlm), ("first-eos", first_eos)):
        assert result[rule].tokens.tolist() == [len(kept)], rule
        assert result[rule].nll[0] == pytest.approx(sum(n for _, n in kept), rel=1e-6), rule
        assert result[rule].ppl == pytest.approx(math.exp(sum(n for _, n in kept) / len(kept)), rel=1e-6)
    assert result["every-token"].tokens[0] == len(targets) == len(sample) - math.ceil(len(sample) / 16)
    assert result["mdlm"].ppl > 1000  # a random judge over a 50k vocabulary: near-uniform, not a near-zero loss


@pytest.fixture(scope="module")
def uniform_judge_dir(tmp_path_factory, tokenizer):
    """A GPT-2 whose weights are all zero: every next-token distribution is uniform over the 50,257 tokens."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=8, n_layer=1, n_head=1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    path = tmp_path_factory.mktemp("uniform_judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("context, max_length, counts", [
    # [BOS] the cat sat [EOS] on the mat [EOS] [EOS] today: 11 tokens, 10 targets, counted by hand.
    (64, None, {"mdlm": 7, "first-eos": 4, "every-token": 10}),  # mdlm: the EOS targets are not counted
    # chunks [BOS] the cat sat [EOS] on | the mat [EOS] [EOS] today: the second chunk's first EOS counts (mdlm)
    (6, None, {"mdlm": 4 + 3, "first-eos": 4, "every-token": 5 + 4}),
    (64, 8, {"mdlm": 6, "first-eos": 4, "every-token": 7}),  # truncated to the model length 8
])
def test_token_rules_counted_by_hand_under_a_uniform_judge(uniform_judge_dir, tokenizer, context, max_length,
                                                             counts):
    judge = load_judge(str(uniform_judge_dir), context=context)
    sample = [EOS, 262, 3797, 3332, EOS, 319, 262, 2603, EOS, EOS, 1909]  # " the cat sat", " on the mat", " today"
    result = generative_perplexity([sample], tokenizer, judge, max_length=max_length)
    for rule, count in counts.items():
        assert result[rule].tokens.tolist() == [count], rule
        assert result[rule].nll[0] == pytest.approx(count * math.log(50257), rel=1e-6), rule  # log V per token
        assert result[rule].ppl == pytest.approx(50257, rel=1e-5)


def test_first_eos_rule(judge_dir, tokenizer):
    assert first_eos_cut([EOS, 1, 2, EOS, 3, EOS], EOS) == [EOS, 1, 2, EOS]
    assert first_eos_cut([EOS, 1, 2, 3], EOS) == [EOS, 1, 2, 3]  # no EOS after [BOS]: everything
    assert first_eos_cut([5, EOS, 7], EOS) == [5, EOS]  # the EOS itself is counted
    judge = load_judge(str(judge_dir))
    a = tokenizer.encode(TEXT_A)
    tails = [[EOS, *a, EOS, *tokenizer.encode(TEXT_B)], [EOS, *a, EOS, *tokenizer.encode(" other words entirely")]]
    scored = generative_perplexity(tails, tokenizer, judge)
    result, every = scored["first-eos"], scored["every-token"]
    assert result.tokens.tolist() == [len(a) + 1] * 2  # up to and including the first EOS
    assert result.nll[0] == result.nll[1]  # what follows the first EOS does not matter
    assert every.tokens[0] == len(tails[0]) - 1 and every.nll[0] > result.nll[0]
    assert scored["mdlm"].nll[0] != scored["mdlm"].nll[1]  # MDLM's rule scores what follows too


def test_no_sample_dropped_when_the_count_does_not_fill_a_batch(judge_dir, tokenizer):
    judge = load_judge(str(judge_dir), context=8)
    words = TEXT_A.split()
    samples = [[EOS, *tokenizer.encode(" ".join(words[: 3 + 2 * i]))] for i in range(5)]
    together = generative_perplexity(samples, tokenizer, judge, batch_size=2)["every-token"]  # last batch short
    alone = [generative_perplexity([s], tokenizer, judge, batch_size=1)["every-token"] for s in samples]
    assert len(together.nll) == 5 and all(together.tokens > 0)
    assert together.tokens.tolist() == [int(r.tokens[0]) for r in alone]
    assert together.nll == pytest.approx([float(r.nll[0]) for r in alone], rel=1e-6)
    # Pieces of 8 tokens, each scoring all its tokens but the first (a piece of one token scores nothing).
    expected = sum(max(0, len(s[i:i + 8]) - 1) for s in samples for i in range(0, len(s), 8))
    assert together.tokens.sum() == expected


def test_retokenisation_splits_at_eos_and_matches_gpt2_decoding(judge_dir, tokenizer):
    judge = load_judge(str(judge_dir))
    sample = [EOS, *tokenizer.encode(TEXT_A), EOS, *tokenizer.encode(TEXT_B)]
    direct = tokenizer.encode(tokenizer.decode(sample))  # GPT-2 reads "<|endoftext|>" back as the EOS id
    assert to_judge_tokens(sample, tokenizer, judge) == direct


def test_unigram_entropy_of_known_sequences():
    assert unigram_entropy([5, 5, 7, 9]) == pytest.approx(1.5 * math.log(2), abs=1e-15)  # p = 1/2, 1/4, 1/4
    assert unigram_entropy([3] * 10) == 0.0
    assert unigram_entropy(list(range(1024))) == pytest.approx(math.log(1024), abs=1e-12)
    summary, values = entropy_summary([[1, 1], [1, 2]])
    assert values == [0.0, pytest.approx(math.log(2))]
    assert summary["mean"] == pytest.approx(math.log(2) / 2) and summary["samples"] == 2
    assert summary["sd"] == pytest.approx(math.log(2) / math.sqrt(2))


def test_judge_errors_are_one_line(tmp_path, judge_dir):
    with pytest.raises(CheckpointError, match="no config.json") as info:
        load_judge(str(tmp_path / "missing"))
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="context 100"):
        load_judge(str(judge_dir), context=100)  # the judge has 64 positions


def test_mauve_separates_samples_from_their_own_distribution(judge_dir, tokenizer, shared_data):
    pytest.importorskip("mauve")
    from mdlm_sched.data import iter_documents

    judge = load_judge(str(judge_dir))
    docs = iter_documents(str(shared_data / "owt_tiny.jsonl"))
    real = [tokenizer.encode(next(docs))[:48] for _ in range(60)]
    repeated = [[tok] * 48 for tok in tokenizer.encode(" the of and a in to is was for on") * 6]  # one token each
    features_real, features_repeated = judge_features(real, judge), judge_features(repeated, judge)
    assert features_real.shape == (60, 32) and features_real.dtype == np.float32
    halves = mauve_scores(features_real[:30], features_real[30:], seeds=[0, 1])  # real text against real text
    apart = mauve_scores(features_repeated, features_real, seeds=[0, 1])
    assert apart["mean"] < halves["mean"] - 0.1 and len(apart["values"]) == 2 and apart["samples"] == 60
