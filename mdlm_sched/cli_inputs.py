"""What the sampling commands' own words mean: --model pairs, a prompts file, the runtime and run options.

Part of the command line (mdlm_sched.cli). The library is imported inside each function, as in the cli, so that
`--help` and bad words do not wait for torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mdlm_sched.errors import UserError

if TYPE_CHECKING:
    from mdlm_sched.config import RuntimeConfig


def model_pairs(pairs: list[str]) -> dict[str, str]:
    """--model NAME=PATH words -> {name: path}; a malformed or repeated name is a UserError."""
    models: dict[str, str] = {}
    for pair in pairs:
        name, eq, path = pair.partition("=")
        if not eq or not name or not path:
            raise UserError(f"--model {pair!r} is not NAME=PATH; write e.g. --model large=runs/large")
        if name in models:
            raise UserError(f"model name {name!r} is given twice; give each model its own name")
        models[name] = path
    return models


def read_prompt_file(path: str) -> tuple[list[str], list[list[int]]]:
    """A JSON-lines prompts file -> (texts, token-id lists); a bad line is a UserError naming it."""
    from mdlm_sched.data import text_lines

    texts, ids = [], []
    try:
        lines = list(text_lines(Path(path)))  # a line that is not UTF-8 is named
    except OSError as exc:
        raise UserError(f"cannot read prompts file {path} ({exc.strerror}); give a JSON-lines file") from exc
    for n, line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{n} is not JSON; write one {{\"text\": ...}} or {{\"token_ids\": [...]}} "
                            f"per line") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, dict) and isinstance(item.get("token_ids"), list) and all(
                isinstance(t, int) for t in item["token_ids"]):
            ids.append(item["token_ids"])
        else:
            raise UserError(f"{path}:{n} has neither a \"text\" string nor a \"token_ids\" list of integers")
    if not (texts or ids):
        raise UserError(f"prompts file {path} holds no prompts; write one {{\"text\": ...}} per line, or leave "
                        f"--prompts-file out to sample unconditionally")
    return texts, ids


def runtime_from_args(args: argparse.Namespace) -> RuntimeConfig:
    """The RuntimeConfig of the sampling commands' --device/--precision/--compile/--cuda-graph-rows."""
    from mdlm_sched.config import RuntimeConfig

    return RuntimeConfig(device=args.device, precision=args.precision, compile=args.compile,
                         cuda_graph_rows=args.cuda_graph_rows)


def add_sampling_run_args(p: argparse.ArgumentParser, out: str) -> None:
    """Options of every command that loads denoisers and samples: length, t_min, output, device."""
    from mdlm_sched.config import RuntimeConfig
    from mdlm_sched.sampling_config import SamplingConfig

    sampling, runtime = SamplingConfig(), RuntimeConfig()
    p.add_argument("--seq-len", type=int, default=sampling.seq_len, help="sequence length (default: the models')")
    p.add_argument("--t-min", type=float, default=sampling.t_min,
                   help=f"the last step ends at this t (default {sampling.t_min:g})")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--device", default=runtime.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default=runtime.precision, help="auto (bf16 on cuda) | bf16 | fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--cuda-graph-rows", type=int, default=runtime.cuda_graph_rows,
                   help="on a GPU, network calls of at most this many sequences replay captured CUDA graphs "
                        f"(0 = off; default {runtime.cuda_graph_rows})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
