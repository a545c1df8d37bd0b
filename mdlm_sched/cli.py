"""`mdlm-sched <subcommand>`: the command-line entry point.

Bad input ends with one line on stderr and exit code 2; a diverged training run with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mdlm_sched.errors import NonFiniteLossError, UserError

CONFIG_HELP = ("config words, in order: section=preset (configs/<section>/<preset>.yaml), "
               "a.b=value overrides, or YAML files")


def _train(args: argparse.Namespace) -> int:
    from mdlm_sched.config import load

    cfg = load(args.config)  # before importing the trainer (and transformers): bad input fails fast
    from mdlm_sched.train import train

    result = train(cfg, progress=not args.no_progress)
    kind = "perplexity bound" if cfg.model.arch == "mdlm" else "perplexity"
    print(f"trained {cfg.model.arch} to step {result.step} in {result.out_dir}")
    if result.last_loss is not None:
        print(f"  last training loss: {result.last_loss:.4f}")
    for name, ppl in result.val.items():
        print(f"  val/{name} {kind}: {ppl:.2f}")
    print(f"  model (Hugging Face format): {result.model_dir}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from mdlm_sched.config import load, to_yaml

    print(to_yaml(load(args.config)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdlm-sched", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an MLA-MDLM (model.arch=mdlm) or the GPT-2 judge (model.arch=gpt2)")
    p.add_argument("config", nargs="*", help=CONFIG_HELP)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=_train)
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("config", nargs="*", help=CONFIG_HELP)
    p.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"mdlm-sched: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdlm-sched: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        print(f"mdlm-sched: training stopped: {exc}", file=sys.stderr)
        return 1
