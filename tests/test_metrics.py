"""Gen PPL under a judge saved to disk (golden value from an independent computation), entropy, first-EOS rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mdlm_sched.data import load_tokenizer
from mdlm_sched.errors import CheckpointError
from mdlm_sched.metrics import (chunks, entropy_summary, first_eos_cut, generative_perplexity, load_judge,
                                to_judge_tokens, unigram_entropy)

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


def independent_ppl(model: torch.nn.Module, ids: list[int], context: int) -> tuple[float, int]:
    """Sum of -log p(token i+1 | tokens <= i) over chunks of `context`, each chunk run alone, float64 numpy."""
    total, count = 0.0, 0
    for start in range(0, len(ids), context):
        chunk = ids[start:start + context]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double().numpy()  # [n, V]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        total -= sum(log_probs[i, chunk[i + 1]] for i in range(len(chunk) - 1))
        count += len(chunk) - 1
    return total, count


def test_golden_gen_ppl_equals_an_independent_computation(judge_dir, tokenizer):
    judge = load_judge(str(judge_dir), context=16)  # 16-token chunks: the cut text spans several
    a, b = tokenizer.encode(TEXT_A), tokenizer.encode(TEXT_B)
    sample = [EOS, *a, EOS, *b]  # [BOS] document [EOS] next document: only [BOS] a [EOS] is scored
    result = generative_perplexity([sample], tokenizer, judge, batch_size=3)
    total, count = independent_ppl(judge.model, [EOS, *a, EOS], 16)
    assert result.tokens.tolist() == [count]
    assert count == len(a) + 1 - math.ceil((len(a) + 2) / 16) + 1  # targets minus each extra chunk's first token
    assert result.nll[0] == pytest.approx(total, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert result.ppl > 1000  # a random judge over a 50k vocabulary: near-uniform, not a near-zero loss


def test_first_eos_rule(judge_dir, tokenizer):
    assert first_eos_cut([EOS, 1, 2, EOS, 3, EOS], EOS) == [EOS, 1, 2, EOS]
    assert first_eos_cut([EOS, 1, 2, 3], EOS) == [EOS, 1, 2, 3]  # no EOS after [BOS]: everything
    assert first_eos_cut([5, EOS, 7], EOS) == [5, EOS]  # the EOS itself is counted
    judge = load_judge(str(judge_dir))
    a = tokenizer.encode(TEXT_A)
    tails = [[EOS, *a, EOS, *tokenizer.encode(TEXT_B)], [EOS, *a, EOS, *tokenizer.encode(" other words entirely")]]
    result = generative_perplexity(tails, tokenizer, judge)
    assert result.tokens.tolist() == [len(a) + 1] * 2  # up to and including the first EOS
    assert result.nll[0] == result.nll[1]  # what follows the first EOS does not matter
    every = generative_perplexity(tails, tokenizer, judge, first_eos=False)
    assert every.tokens[0] == len(tails[0]) - 1 and every.nll[0] > result.nll[0]


def test_no_sample_dropped_when_the_count_does_not_fill_a_batch(judge_dir, tokenizer):
    judge = load_judge(str(judge_dir), context=8)
    words = TEXT_A.split()
    samples = [[EOS, *tokenizer.encode(" ".join(words[: 3 + 2 * i]))] for i in range(5)]
    together = generative_perplexity(samples, tokenizer, judge, batch_size=2)  # chunks in batches of 2: last short
    alone = [generative_perplexity([s], tokenizer, judge, batch_size=1) for s in samples]
    assert len(together.nll) == 5 and all(together.tokens > 0)
    assert together.tokens.tolist() == [int(r.tokens[0]) for r in alone]
    assert together.nll == pytest.approx([float(r.nll[0]) for r in alone], rel=1e-6)
    expected = sum(len(c) - 1 for s in samples for c in chunks(s, 8))
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
