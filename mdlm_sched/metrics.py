"""Sample quality: generative perplexity under an autoregressive judge, unigram entropy, MAUVE.

The field's protocol (REFERENCE.md section 3), as MDLM's code runs it:
- decode each sample to text and re-tokenize it with the judge's tokenizer. A sample is split at the
  denoiser's EOS tokens and each piece is re-tokenized on its own, the judge's EOS id put back
  between pieces, so any causal LM can judge (not only one whose tokenizer reads "<|endoftext|>");
- truncate to the model length (MDLM: its sequence length, 1024) and split into chunks of the
  judge's context (1024 for GPT-2), scored independently: token i + 1 given tokens up to i, so each
  chunk's first token is context only;
- count the target tokens of a token rule (TOKEN_RULES), sum their negative log-likelihoods in
  float64 over all samples and take exp(sum NLL / sum count). Every sample is scored, whatever the
  batch size (MDLM's code drops the samples that do not fill a last batch).
Token rules, all computed in one pass:
- "mdlm" (the default, comparable with published MDLM / Duo / ReMDM numbers): every target that is
  not EOS, plus a chunk's first EOS (MDLM's mask first_eos | token_mask). Samples start with [BOS] =
  EOS, so in practice every target that is not EOS;
- "first-eos": every target up to and including the first EOS after position 0; later tokens are
  not scored (this project's first rule; it drops about 40% of the tokens of 1024-token samples);
- "every-token": every target (the judge's plain perplexity; used on real text).
The judge runs in float32 (TF32 off), so its head and log-softmax are float32 as the protocol asks.

Entropy: the unigram entropy (nats) of each sample's token histogram, over the denoiser's token
ids at every position; its mean is reported beside gen PPL (low gen PPL with low entropy means
repetitive text, not better text).

MAUVE (Pillutla et al. 2021, the mauve-text package) compares the samples with real text as two
distributions of judge features: the judge's last hidden state at the last token of each sample's
first chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mdlm_sched.artifacts import HF_CONFIG, model_folder
from mdlm_sched.errors import CheckpointError, ConfigError
from mdlm_sched.hub import HUB_PREFIX, local_path, snapshot
from mdlm_sched.ranks import ONE_PROCESS, DistContext
from mdlm_sched.sampling_config import TOKEN_RULES

PROTOCOL_CONTEXT = 1024  # the field's chunk length


@dataclass
class Judge:
    """An autoregressive LM that scores samples, with its tokenizer and chunk length."""

    model: Any  # a transformers causal LM, eval mode, float32
    tokenizer: Any
    context: int  # tokens per scored chunk
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id


def load_judge(name_or_path: str, device: torch.device | str = "cpu", context: int | None = None) -> Judge:
    """Load any Hugging Face causal LM as the judge: a local folder (or training run folder) or a hub name.

    context: tokens per chunk; default min(1024, the judge's maximum positions).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = model_folder(name_or_path)
    looks_local = Path(name_or_path).exists() or str(name_or_path).startswith((".", "/"))
    if looks_local and not (local / HF_CONFIG).is_file():
        raise CheckpointError(f"judge {name_or_path}: no {HF_CONFIG} there; give a trained judge's folder "
                              f"(or its training run folder) or a hub name such as gpt2-large")
    if str(name_or_path).startswith(HUB_PREFIX):  # hf:REPO[@REVISION], as models are named
        source = local_path(str(name_or_path), f"judge {name_or_path}")
    else:
        source = local if looks_local else snapshot(name_or_path, None, f"judge {name_or_path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"judge {name_or_path} cannot be loaded ({str(exc).splitlines()[0][:200]}); give a "
                              f"causal LM folder, or a hub name with network access") from exc
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info[kind]:  # transformers would fill missing weights at random and judge with them
            first = sorted(info[kind])[0]
            raise CheckpointError(f"judge {name_or_path}: its weights and its {HF_CONFIG} do not match "
                                  f"({kind.replace('_', ' ')[:-1]} {first!r}); give a complete causal LM folder")
    tokenizer.model_max_length = int(1e30)  # texts are chunked here: no "sequence too long" warning
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"judge {name_or_path} has no EOS token; the first-EOS rule needs one")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    context = context or min(PROTOCOL_CONTEXT, limit or PROTOCOL_CONTEXT)
    if context < 2 or (limit is not None and context > limit):
        raise CheckpointError(f"judge context {context} must be in [2, {limit}] (the judge's positions)")
    return Judge(model.to(device).eval(), tokenizer, context, str(name_or_path))


def to_judge_tokens(token_ids: Sequence[int], tokenizer: Any, judge: Judge) -> list[int]:
    """A denoiser sample's token ids re-tokenized for the judge (split at EOS, pieces encoded, EOS put back)."""
    eos = tokenizer.eos_token_id
    pieces: list[list[int]] = [[]]
    for tok in token_ids:
        if tok == eos:
            pieces.append([])
        else:
            pieces[-1].append(tok)
    out: list[int] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            out.append(judge.eos_id)
        if piece:
            out.extend(judge.tokenizer.encode(tokenizer.decode(piece), add_special_tokens=False))
    return out


def first_eos_cut(ids: Sequence[int], eos_id: int) -> list[int]:
    """ids up to and including the first EOS after position 0 (all of them if there is none)."""
    for j in range(1, len(ids)):
        if ids[j] == eos_id:
            return list(ids[: j + 1])
    return list(ids)


@dataclass
class GenPPL:
    """Generative perplexity of a set of samples under one token rule, with what it was computed from."""

    nll: np.ndarray  # [N] float64: summed NLL (nats) of each sample's scored tokens
    tokens: np.ndarray  # [N] int64: tokens scored per sample
    rule: str

    @property
    def ppl(self) -> float:
        """exp(sum NLL / sum tokens), float64 (inf if nothing was scored)."""
        total = int(self.tokens.sum())
        return math.exp(float(self.nll.sum()) / total) if total else math.inf

    def summary(self, judge: str) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll_sum": float(self.nll.sum()), "tokens": int(self.tokens.sum()),
                "samples": len(self.nll), "judge": judge, "token_rule": self.rule}


@contextmanager
def _strict_float32() -> Iterator[None]:
    """Plain float32 matmuls (no TF32) for the judge."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass(frozen=True)
class _Chunk:
    sample: int  # index of the sample it belongs to
    ids: list[int]  # at most the judge's context
    first_eos_targets: int  # how many of its leading tokens lie within the sample's first-EOS cut


def _padded(batch: Sequence[_Chunk], judge: Judge) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [b, w] (padded with EOS) and their validity mask [b, w] of a batch of chunks, on the judge's device."""
    width = max(len(c.ids) for c in batch)
    ids = torch.full((len(batch), width), judge.eos_id, dtype=torch.long)
    valid = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, chunk in enumerate(batch):
        ids[row, : len(chunk.ids)] = torch.tensor(chunk.ids)
        valid[row, : len(chunk.ids)] = True
    return ids.to(judge.device), valid.to(judge.device)


@torch.no_grad()
def _score_chunks(batch: Sequence[_Chunk], judge: Judge) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per token rule: summed NLL (float64) [b] and scored-token count [b] of each chunk of one judge batch."""
    ids, valid = _padded(batch, judge)
    logits = judge.model(input_ids=ids, attention_mask=valid.long()).logits.float()  # [b, w, V]
    token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double()  # [b, w-1]
    eos = (ids == judge.eos_id) & valid  # [b, w]
    first_eos = eos & (eos.cumsum(dim=1) == 1)  # the chunk's first EOS (MDLM's mask is computed per chunk)
    limit = torch.tensor([c.first_eos_targets for c in batch], device=ids.device)[:, None]  # [b, 1]
    counted = {  # targets [b, w-1] each rule scores
        "mdlm": (valid & (~eos | first_eos))[:, 1:],
        "first-eos": (valid & (torch.arange(ids.shape[1], device=ids.device)[None] < limit))[:, 1:],
        "every-token": valid[:, 1:],
    }
    return {rule: (token_nll.masked_fill(~mask, 0.0).sum(dim=1).cpu().numpy(), mask.sum(dim=1).cpu().numpy())
            for rule, mask in counted.items()}


def _chunked(samples: Sequence[Sequence[int]], judge: Judge, max_length: int | None) -> list[_Chunk]:
    """Every sample truncated to max_length (None: not truncated) and cut into chunks of the judge's context."""
    out = []
    for i, ids in enumerate(samples):
        ids = list(ids[:max_length])
        cut = len(first_eos_cut(ids, judge.eos_id))
        for start in range(0, len(ids), judge.context):
            piece = ids[start:start + judge.context]
            if len(piece) >= 2:
                out.append(_Chunk(i, piece, max(0, min(len(piece), cut - start))))
    return out


def score_token_ids(samples: Sequence[Sequence[int]], judge: Judge, batch_size: int = 16,
                    max_length: int | None = None, progress: bool = False,
                    ctx: DistContext = ONE_PROCESS) -> dict[str, GenPPL]:
    """Judge NLL of samples already in the judge's tokens, under every token rule (the module docstring).

    max_length: the model length samples are truncated to (MDLM's code: the denoiser's sequence length).
    Under torchrun the judge batches are dealt out to the ranks; every rank gets every batch's values and
    adds them up in one process's order, so the result is the same to the last bit.
    """
    pieces = sorted(_chunked(samples, judge, max_length), key=lambda c: -len(c.ids))  # less padding per batch
    # The last batch may be short: nothing is dropped.
    batches = [pieces[start:start + batch_size] for start in range(0, len(pieces), batch_size)]
    bar = tqdm(total=len(ctx.share(len(batches))), desc="judge", unit="batch", disable=not progress, leave=False)

    def score(k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = _score_chunks(batches[k], judge)
        bar.update(1)
        return out

    with _strict_float32():
        scored = ctx.map_sharded(len(batches), score)
    bar.close()
    out = {}
    for rule in TOKEN_RULES:
        nll = np.zeros(len(samples), dtype=np.float64)
        counts = np.zeros(len(samples), dtype=np.int64)
        for batch, by_rule in zip(batches, scored):
            chunk_nll, chunk_counts = by_rule[rule]
            for row, chunk in enumerate(batch):
                nll[chunk.sample] += chunk_nll[row]
                counts[chunk.sample] += chunk_counts[row]
        out[rule] = GenPPL(nll=nll, tokens=counts, rule=rule)
    return out


def judge_tokens(samples: Sequence[Sequence[int]], tokenizer: Any, judge: Judge,
                 ctx: DistContext = ONE_PROCESS) -> list[list[int]]:
    """Denoiser samples (token ids of `tokenizer`) re-tokenized for the judge (to_judge_tokens of each).

    Under torchrun the samples are dealt out to the ranks and every rank gets them all back.
    """
    return ctx.map_sharded(len(samples), lambda i: to_judge_tokens(samples[i], tokenizer, judge))


def generative_perplexity(samples: Sequence[Sequence[int]], tokenizer: Any, judge: Judge, batch_size: int = 16,
                          max_length: int | None = None, progress: bool = False) -> dict[str, GenPPL]:
    """Gen PPL of denoiser samples (token ids of `tokenizer`) under the judge, by every token rule."""
    return score_token_ids(judge_tokens(samples, tokenizer, judge), judge, batch_size, max_length, progress)


@torch.no_grad()
def judge_features(samples: Sequence[Sequence[int]], judge: Judge, batch_size: int = 16,
                   max_length: int | None = None) -> np.ndarray:
    """MAUVE's features [N, d] (float32): the judge's last hidden state at the last token of each sample's first
    chunk (samples in the judge's tokens, truncated to max_length)."""
    firsts = [_Chunk(i, list(ids[:max_length])[: judge.context], 0) for i, ids in enumerate(samples)]
    out = []
    with _strict_float32():
        for start in range(0, len(firsts), batch_size):
            batch = firsts[start:start + batch_size]
            ids, valid = _padded(batch, judge)
            hidden = judge.model(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
            last = hidden.hidden_states[-1].float()  # [b, w, d]
            out.append(last[torch.arange(len(batch)), valid.sum(dim=1) - 1].cpu().numpy())
    return np.concatenate(out)


def mauve_scores(features: np.ndarray, reference: np.ndarray, seeds: Sequence[int]) -> dict[str, Any]:
    """MAUVE of sample features against reference features, once per k-means seed: mean, s.d. and the values."""
    try:
        import mauve
    except ImportError:
        raise ConfigError("mauve: true needs the mauve-text package; pip install 'mdlm-sched[mauve]'") from None
    values = [float(mauve.compute_mauve(p_features=features, q_features=reference, seed=seed, verbose=False).mauve)
              for seed in seeds]
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values, "samples": len(features), "reference_samples": len(reference),
            "features": "judge's last hidden state at the last token of the first chunk"}


def unigram_entropy(token_ids: Sequence[int]) -> float:
    """Entropy (nats, float64) of the token histogram of one sample."""
    _, counts = np.unique(np.asarray(token_ids), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def entropy_summary(samples: Sequence[Sequence[int]]) -> tuple[dict[str, Any], list[float]]:
    """Mean and standard deviation of the per-sample unigram entropy, and the values."""
    values = [unigram_entropy(s) for s in samples]
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "samples": len(values), "unit": "nats"}, values
