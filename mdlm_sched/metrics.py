"""Sample quality: generative perplexity under an autoregressive judge, and unigram entropy.

The field's protocol (REFERENCE.md section 3):
- decode each sample to text and re-tokenize it with the judge's tokenizer. A sample is split at the
  denoiser's EOS tokens and each piece is re-tokenized on its own, the judge's EOS id put back
  between pieces, so any causal LM can judge (not only one whose tokenizer reads "<|endoftext|>");
- count target tokens up to and including the first EOS after position 0 (position 0 is the
  sample's [BOS], context only); later tokens are not scored;
- split into chunks of the judge's context (1024 for GPT-2), scored independently: token i + 1
  given tokens up to i, so each chunk's first token is context only;
- sum the negative log-likelihoods in float64 over all samples and take exp(sum NLL / sum count).
  Every sample is scored, whatever the batch size.
The judge runs in float32 (TF32 off), so its head and log-softmax are float32 as the protocol asks.

Entropy: the unigram entropy (nats) of each sample's token histogram, over the denoiser's token
ids at every position; its mean is reported beside gen PPL (low gen PPL with low entropy means
repetitive text, not better text).
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

from mdlm_sched.artifacts import model_folder
from mdlm_sched.distributed import ONE_PROCESS, DistContext
from mdlm_sched.errors import CheckpointError

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
    if looks_local and not (local / "config.json").is_file():
        raise CheckpointError(f"judge {name_or_path}: no config.json there; give a trained judge's folder "
                              f"(or its training run folder) or a hub name such as gpt2-large")
    source = str(local) if looks_local else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"judge {name_or_path} cannot be loaded ({str(exc).splitlines()[0][:200]}); give a "
                              f"causal LM folder, or a hub name with network access") from exc
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


def chunks(ids: Sequence[int], context: int) -> list[list[int]]:
    """Consecutive pieces of at most `context` tokens; pieces of one token (nothing to score) are left out."""
    return [list(ids[i:i + context]) for i in range(0, len(ids), context) if len(ids[i:i + context]) >= 2]


@dataclass
class GenPPL:
    """Generative perplexity of a set of samples, with what it was computed from."""

    nll: np.ndarray  # [N] float64: summed NLL (nats) of each sample's scored tokens
    tokens: np.ndarray  # [N] int64: tokens scored per sample

    @property
    def ppl(self) -> float:
        """exp(sum NLL / sum tokens), float64 (inf if nothing was scored)."""
        total = int(self.tokens.sum())
        return math.exp(float(self.nll.sum()) / total) if total else math.inf

    def summary(self, judge: str, first_eos: bool) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll_sum": float(self.nll.sum()), "tokens": int(self.tokens.sum()),
                "samples": len(self.nll), "judge": judge, "first_eos": first_eos}


@contextmanager
def _strict_float32() -> Iterator[None]:
    """Plain float32 matmuls (no TF32) for the judge."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def _score_chunks(batch: Sequence[tuple[int, list[int]]], judge: Judge) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (float64) and scored-token count of each chunk of one judge batch of (sample index, chunk)."""
    width = len(batch[0][1])
    ids = torch.full((len(batch), width), judge.eos_id, dtype=torch.long)
    valid = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, (_, chunk) in enumerate(batch):
        ids[row, : len(chunk)] = torch.tensor(chunk)
        valid[row, : len(chunk)] = True
    ids, valid = ids.to(judge.device), valid.to(judge.device)
    logits = judge.model(input_ids=ids, attention_mask=valid.long()).logits.float()  # [b, w, V]
    token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [b, w-1]
    token_nll = token_nll.double().masked_fill(~valid[:, 1:], 0.0).sum(dim=1).cpu().numpy()
    return token_nll, valid[:, 1:].sum(dim=1).cpu().numpy()


def score_token_ids(samples: Sequence[Sequence[int]], judge: Judge, batch_size: int = 16, first_eos: bool = True,
                    progress: bool = False, ctx: DistContext = ONE_PROCESS) -> GenPPL:
    """Judge NLL of samples already in the judge's tokens (the protocol's cut, chunks and float64 sums).

    Under torchrun the judge batches are dealt out to the ranks; every rank gets every batch's values and
    adds them up in one process's order, so the result is the same to the last bit.
    """
    pieces = []  # (sample index, chunk)
    for i, ids in enumerate(samples):
        kept = first_eos_cut(ids, judge.eos_id) if first_eos else list(ids)
        pieces.extend((i, c) for c in chunks(kept, judge.context))
    pieces.sort(key=lambda p: -len(p[1]))  # similar lengths batched together: less padding
    # The last batch may be short: nothing is dropped.
    batches = [pieces[start:start + batch_size] for start in range(0, len(pieces), batch_size)]
    bar = tqdm(total=len(ctx.share(len(batches))), desc="judge", unit="batch", disable=not progress, leave=False)

    def score(k: int) -> tuple[np.ndarray, np.ndarray]:
        out = _score_chunks(batches[k], judge)
        bar.update(1)
        return out

    with _strict_float32():
        scored = ctx.map_sharded(len(batches), score)
    bar.close()
    nll = np.zeros(len(samples), dtype=np.float64)
    counts = np.zeros(len(samples), dtype=np.int64)
    for batch, (chunk_nll, chunk_counts) in zip(batches, scored):
        for row, (i, _) in enumerate(batch):
            nll[i] += chunk_nll[row]
            counts[i] += chunk_counts[row]
    return GenPPL(nll=nll, tokens=counts)


def judge_tokens(samples: Sequence[Sequence[int]], tokenizer: Any, judge: Judge,
                 ctx: DistContext = ONE_PROCESS) -> list[list[int]]:
    """Denoiser samples (token ids of `tokenizer`) re-tokenized for the judge (to_judge_tokens of each).

    Under torchrun the samples are dealt out to the ranks and every rank gets them all back.
    """
    return ctx.map_sharded(len(samples), lambda i: to_judge_tokens(samples[i], tokenizer, judge))


def generative_perplexity(samples: Sequence[Sequence[int]], tokenizer: Any, judge: Judge, batch_size: int = 16,
                          first_eos: bool = True, progress: bool = False) -> GenPPL:
    """Gen PPL of denoiser samples (token ids of `tokenizer`) under the judge, by the field's protocol."""
    return score_token_ids(judge_tokens(samples, tokenizer, judge), judge, batch_size, first_eos, progress)


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
