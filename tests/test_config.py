"""mdlm_sched.config (presets, overrides, validation) and the CLI's error contract (one line, exit code 2)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdlm_sched.config import RunConfig
from mdlm_sched.config_load import from_yaml, load, to_yaml
from mdlm_sched.errors import ConfigError, UserError
from mdlm_sched.models import build_model, model_vocab_size

from conftest import REPO, SHARED_DATA, TOKENIZER

GPT2_TOKENS = 50257
SHORT = ("data.seq_len=128",)  # the tiny presets support 128 positions


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch, shared_data: Path) -> None:
    """data.root defaults to ../shared/data, relative to the working folder: run from the checkout."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MDLM_SCHED_CONFIGS", raising=False)


# -------------------------------------------------------------------------------- defaults, presets


def test_load_without_args_gives_dataclass_defaults() -> None:
    cfg = load([])
    assert isinstance(cfg, RunConfig)
    m = cfg.model
    assert (m.arch, m.hidden_size, m.num_hidden_layers, m.num_attention_heads) == ("mdlm", 768, 12, 12)
    assert m.kv_lora_rank == 256 and m.q_lora_rank == 0 and m.vocab_size is None
    assert cfg.data.seq_len == 1024
    assert cfg.data.root == "../shared/data"
    # ${data.root} interpolations are resolved
    assert cfg.data.train == ["../shared/data/owt_train.jsonl.xz"]
    assert cfg.data.val == {"owt": "../shared/data/owt_val.jsonl.xz"}
    assert cfg.data.tokenizer == "../shared/data/gpt2-tokenizer"
    assert (REPO / cfg.data.train[0]).resolve() == (SHARED_DATA / "owt_train.jsonl.xz").resolve()
    # everything else equals the dataclass defaults
    defaults = RunConfig()
    for section in ("noise", "train", "runtime"):
        assert getattr(cfg, section) == getattr(defaults, section)
    assert cfg.model == defaults.model


@pytest.mark.parametrize(
    ("preset", "arch", "layers", "hidden"),
    [("tiny", "mdlm", 2, 64), ("small", "mdlm", 4, 768), ("large", "mdlm", 12, 768), ("judge_tiny", "gpt2", 2, 64)],
)
def test_model_presets(preset: str, arch: str, layers: int, hidden: int) -> None:
    m = load([f"model={preset}", "data.seq_len=128"]).model
    assert (m.arch, m.num_hidden_layers, m.hidden_size) == (arch, layers, hidden)


def test_tiny_preset_fields() -> None:
    m = load(["model=tiny", "data.seq_len=128"]).model
    assert (m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (32, 16, 8, 16)
    assert m.max_seq_len == 128 and m.vocab_pad_multiple == 1
    assert m.dropout == 0.1 and m.cond_dim == 128  # fields the preset does not name keep their defaults


def test_data_preset_replaces_the_section() -> None:
    d = load(["data=owt_tiny"]).data
    assert d.val == {"owt_heldout": "../shared/data/owt_train.jsonl.xz"}  # no default "owt" entry left
    assert d.train == ["../shared/data/owt_tiny.jsonl"]
    assert d.max_docs == 300 and d.seq_len == 128
    assert set(load(["data=mixture"]).data.val) == {"owt", "blogs", "news", "web_cc"}


def test_data_root_override_resolves_every_path() -> None:
    root = str(SHARED_DATA.resolve())
    d = load(["data=owt_tiny", f"data.root={root}"]).data
    assert d.train == [f"{root}/owt_tiny.jsonl"]
    assert d.val == {"owt_heldout": f"{root}/owt_train.jsonl.xz"}
    assert d.tokenizer == f"{root}/gpt2-tokenizer"


def test_tiny_model_needs_short_sequences() -> None:
    # the tiny presets support 128 positions; the default data.seq_len (1024) does not fit them
    with pytest.raises(ConfigError, match="data.seq_len=1024"):
        load(["model=tiny"])
    assert load(["model=tiny", "data=owt_tiny"]).data.seq_len == 128


def test_later_words_win() -> None:
    assert load(["model=tiny", "model.hidden_size=96", "data.seq_len=128"]).model.hidden_size == 96
    # a preset replaces its whole section over the defaults, so it undoes earlier overrides of that section
    cfg = load(["model.hidden_size=96", "model.dropout=0.2", "train.steps=5", "model=tiny", "data.seq_len=128"])
    assert cfg.model.hidden_size == 64 and cfg.model.dropout == 0.1
    assert cfg.train.steps == 5  # other sections are left alone
    assert load(["model=tiny", "model=small"]).model.num_hidden_layers == 4
    cfg = load(["train=cpu_tiny", "train.steps=3"])
    assert cfg.train.steps == 3 and cfg.train.batch_size == 8 and cfg.train.lr == pytest.approx(1e-3)


def test_yaml_file_merges(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 96\n  num_hidden_layers: 3\ntrain:\n  steps: 7\n  lr: 0.01\n")
    cfg = load(["model=tiny", "data.seq_len=128", str(path)])
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.kv_lora_rank) == (96, 3, 32)
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(0.01)
    assert cfg.train.batch_size == 512  # untouched fields keep their values
    assert load(["model=tiny", *SHORT, str(path), "train.steps=9"]).train.steps == 9
    assert load(["model=tiny", *SHORT, "train.steps=9", str(path)]).train.steps == 7


def _round_trip(cfg: RunConfig, tmp_path: Path) -> None:
    text = to_yaml(cfg)
    assert "${" not in text  # saved resolved
    path = tmp_path / "config.yaml"
    path.write_text(text)
    back = from_yaml(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert to_yaml(back) == text


def test_to_yaml_from_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load(["model=tiny", "data.seq_len=128", "train=cpu_tiny", "runtime=cpu", "train.betas=[0.8,0.95]",
                "model.vocab_size=50258", "noise.eps=0.01", "data.val.blogs=${data.root}/blogs_val.jsonl.xz",
                "model.time_conditioning=true"])
    assert cfg.data.val["blogs"] == "../shared/data/blogs_val.jsonl.xz"
    _round_trip(cfg, tmp_path)


def test_to_yaml_from_yaml_round_trip_with_replaced_val_sources(tmp_path: Path) -> None:
    cfg = load(["model=tiny", "data=owt_tiny", "train=cpu_tiny"])
    assert set(cfg.data.val) == {"owt_heldout"}
    _round_trip(cfg, tmp_path)


# ------------------------------------------------------------------------------------------ errors


def _missing() -> str:
    return str(REPO / "no_such_dir_for_tests" / "x.jsonl")


BAD = [
    (["model.hiden_size=3"], "model.hiden_size"),
    (["train.steps=abc"], "train.steps"),
    (["train.steps=0"], "train.steps"),
    (["model.kv_lora_rank=769"], "model.kv_lora_rank"),
    (["model=tiny", "data=owt_tiny", "model.q_lora_rank=65"], "model.q_lora_rank"),
    (["model.qk_rope_head_dim=7"], "model.qk_rope_head_dim"),
    (["data.seq_len=1025"], "data.seq_len"),
    (["model=tiny", "data=owt_tiny", "data.seq_len=256"], "data.seq_len"),
    (["data.tokenizer=../shared/data/no-such-tokenizer"], "data.tokenizer"),
    (["model=no_such_preset"], "model=no_such_preset"),
    (["data=no_such_preset"], "data=no_such_preset"),
    (["model.arch=bert"], "model.arch"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "train.batch_size"),
    (["runtime.precision=fp16"], "runtime.precision"),
    (["runtime.compile_mode=reduce-overhead"], "runtime.compile_mode"),
    (["noise.schedule=cosine"], "noise.schedule"),
    (["model=judge_tiny", "data=owt_tiny", "model.num_attention_heads=5"], "model.num_attention_heads"),
    (["train.loss_kernel=triton"], "train.loss_kernel"),
    (["model=judge_tiny", "data=owt_tiny", "train.loss_kernel=liger"], "train.loss_kernel"),
]


@pytest.mark.parametrize(("args", "field"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_raises_config_error_naming_the_field(args: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(args)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert field in message
    assert "\n" not in message and message.strip() == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check refuses cuda only where no GPU is visible")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="runtime.device=cuda but no CUDA GPU is visible"):
        load(["runtime.device=cuda"])


def test_help_and_refused_config_words_do_not_import_torch() -> None:
    # --help, the sampling options and a refused config answer before torch loads (seconds on a 2-core machine)
    code = ("import sys; from mdlm_sched.cli import main; from mdlm_sched.sampling_config import SampleConfig\n"
            "try: main(['train', '--help'])\nexcept SystemExit: pass\n"
            "print(main(['train', 'model=tiny', 'noise.schedule=cosine']), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "2 False", out.stderr
    assert "noise.schedule='cosine' is unknown" in out.stderr


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError)


@pytest.mark.parametrize("section", ["train", "val"])
def test_missing_data_file(section: str) -> None:
    missing = _missing()
    arg = f"data.train=[{missing}]" if section == "train" else f"data.val.extra={missing}"
    with pytest.raises(ConfigError) as info:
        load([arg])
    message = str(info.value)
    assert message.startswith("data")
    assert missing in message and "\n" not in message


def test_a_model_only_load_does_not_need_the_data_files() -> None:
    """The speed benchmarks build random-weight models from presets on a machine without ../shared."""
    args = ["model=small", "data.root=/nonexistent-data-root"]
    with pytest.raises(ConfigError, match="does not exist"):
        load(args)
    assert load(args, sources=False).model.num_hidden_layers == 4
    with pytest.raises(ConfigError, match="data.seq_len"):  # the other data checks still run
        load([*args, "data.seq_len=2"], sources=False)


def test_missing_yaml_file_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load([str(tmp_path / "nope.yaml")])


def test_model_vocab_size_must_fit_the_tokenizer() -> None:
    from mdlm_sched.data import load_tokenizer

    tokenizer_len = len(load_tokenizer(str(TOKENIZER)))
    assert tokenizer_len == GPT2_TOKENS
    assert model_vocab_size(load(["model=tiny", *SHORT]), tokenizer_len) == GPT2_TOKENS + 1  # + [MASK]
    assert model_vocab_size(load(["model=tiny", *SHORT, "model.vocab_size=50258"]), tokenizer_len) == 50258
    assert model_vocab_size(load(["model=judge_tiny", *SHORT]), tokenizer_len) == GPT2_TOKENS  # no [MASK]
    assert model_vocab_size(load(["model=judge_tiny", *SHORT, "model.vocab_size=50257"]), tokenizer_len) == 50257

    bad = load(["model=tiny", *SHORT, "model.vocab_size=50257"])
    for call in (lambda: model_vocab_size(bad, tokenizer_len), lambda: build_model(bad, tokenizer_len, 50256, "h")):
        with pytest.raises(ConfigError) as info:
            call()
        assert "model.vocab_size" in str(info.value) and "50258" in str(info.value)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        model_vocab_size(load(["model=judge_tiny", *SHORT, "model.vocab_size=50258"]), tokenizer_len)


def test_build_model_with_a_fitting_vocab_size() -> None:
    cfg = load(["model=tiny", *SHORT, "model.vocab_size=50258"])
    model = build_model(cfg, GPT2_TOKENS, 50256, "h")
    assert model.config.vocab_size == 50258
    assert model.config.mask_token_id == GPT2_TOKENS
    assert model.get_input_embeddings().weight.shape[0] >= 50258


# --------------------------------------------------------------------------------------------- CLI

CLI_CASES = {
    "unknown_key": (["model.hiden_size=3"], "model.hiden_size"),
    "steps_zero": (["train.steps=0"], "train.steps"),
    "seq_len_too_long": (["model=tiny", "data.seq_len=4096"], "data.seq_len"),
    "missing_file": ([f"data.train=[{_missing()}]"], _missing()),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run every bad CLI call at once (each takes a few seconds of imports); fail if any takes too long."""
    env = {k: v for k, v in os.environ.items() if k != "MDLM_SCHED_CONFIGS"}
    procs = {}
    start = time.monotonic()
    for name, (words, _) in CLI_CASES.items():
        out_dir = tmp_path_factory.mktemp(name) / "run"
        cmd = [sys.executable, "-m", "mdlm_sched", "train", f"train.out_dir={out_dir}", *words, "--no-progress"]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out_dir)
    results = {}
    for name, (proc, out_dir) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr, out_dir)
    results["_wall_s"] = time.monotonic() - start
    return results


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_exits_2_with_one_line(cli_runs: dict, name: str) -> None:
    code, stdout, stderr, out_dir = cli_runs[name]
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].strip(), stderr
    assert lines[0].startswith("mdlm-sched: error: ")
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert CLI_CASES[name][1] in lines[0]
    assert stdout == ""
    assert not out_dir.exists()  # failed before anything was built or written


def test_cli_errors_come_before_any_work(cli_runs: dict) -> None:
    # four Python start-ups with imports run side by side; building data or a model would take much longer
    assert cli_runs["_wall_s"] < 60
