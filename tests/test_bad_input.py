"""Bad input as a new user gives it: one line on stderr, exit code 2, no traceback, nothing lost or half-written.

Every command runs as a real process (`python -m mdlm_sched ...`), all of them side by side.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA

OWT_VAL = SHARED_DATA / "owt_val.jsonl.xz"


def _train_words(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "model=tiny", "data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"data.root={SHARED_DATA}",
            f"data.cache_dir={cache}", "data.seq_len=64", "train.batch_size=2", "train.micro_batch_size=2",
            "train.val_batches=1", f"train.out_dir={out}", *extra]


def _bad_files(root: Path) -> dict[str, Path]:
    """A truncated .xz, a file named .xz that is not xz, and JSON lines with bytes that are not UTF-8 (line 3)."""
    good = OWT_VAL.read_bytes()
    files = {"truncated": root / "truncated.jsonl.xz", "not_xz": root / "plain.jsonl.xz",
             "latin1": root / "latin1.jsonl", "latin1_prompts": root / "prompts.jsonl"}
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["not_xz"].write_bytes(lzma.decompress(good)[:5000])
    lines = [json.dumps({"text": "plain ascii"}).encode()] * 2 + ['{"text": "caf\xe9 au lait"}'.encode("latin-1")]
    files["latin1"].write_bytes(b"\n".join(lines) + b"\n")
    files["latin1_prompts"].write_bytes(b"\n".join(lines) + b"\n")
    return files


def _cases(tmp: Path, models: dict[str, Path]) -> dict[str, tuple[list[str], str, Path]]:
    """name -> (command words, fragment of the one error line, a path that must not exist afterwards)."""
    bad = _bad_files(tmp)
    small, large, judge = models["small"], models["large"], models["judge"]
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    grown = tmp / "grown"  # a config edited to one block more than its weights hold
    shutil.copytree(large, grown)
    config = json.loads((grown / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (grown / "config.json").write_text(json.dumps(config))
    sample = ["sample", "--model", f"small={small}", "--model", f"large={large}", "--steps", "8", "--num-samples", "2"]
    sweep_yaml = tmp / "sweep.yaml"
    sweep_yaml.write_text(f"models: {{small: {small}, large: {large}}}\njudge: {judge}\nstep_counts: [8]\n"
                          f"num_samples: 2\nbatch_size: 2\nseq_len: 64\ncache_dir: {tmp / 'sweep_cache'}\n"
                          f"runtime: {{device: cpu}}\n"
                          f"reference: {{sources: {{owt: {bad['not_xz']}}}, num_samples: 2}}\n"
                          f"out_dir: {tmp / 'sweep_ref'}\ngroups: {{g: {{schedules: [all-large]}}}}\n")
    split_yaml = tmp / "split.yaml"
    split_yaml.write_text(sweep_yaml.read_text().replace("[all-large]", "[L2,H6]").replace(
        str(bad["not_xz"]), str(OWT_VAL)).replace("sweep_ref", "sweep_split"))
    yaml_list = tmp / "list.yaml"
    yaml_list.write_text("- model=tiny\n- train.steps=2\n")
    analysed = tmp / "analysed"
    analysed.mkdir()
    (analysed / "per_step.csv").write_text("earlier analysis\n")
    analyze = ["analyze", "--model", f"small={small}", "--model", f"large={large}", "--steps", "8", "--grid", "2",
               "--seq-len", "64", "--data", str(OWT_VAL), "--cache-dir", str(tmp / "c7")]
    return {
        "train_seed_negative": (_train_words(tmp / "t6", tmp / "c8", "train.seed=-1"),
                                "train.seed=-1 must be in [0, 2147483647]", tmp / "t6"),
        "train_lr_inf": (_train_words(tmp / "t7", tmp / "c9", "train.lr=inf"),
                         "train.lr=inf must be a finite number > 0", tmp / "t7"),
        "train_batch_huge": (_train_words(tmp / "t8", tmp / "c10", "train.batch_size=100000000"),
                             "tokens per step is above 2,147,483,648", tmp / "t8"),
        "config_yaml_list": (["train", str(yaml_list)], "holds a YAML list, not a mapping", tmp / "nothing"),
        "sample_num_samples_not_int": ([*sample, "--num-samples", "1e12", "--out", str(tmp / "s4")],
                                       "argument --num-samples: invalid int value: '1e12'", tmp / "s4"),
        "sample_prompt_too_long": ([*sample, "--prompt", "word " * 300, "--out", str(tmp / "s5")],
                                   "prompt 0 has", tmp / "s5"),
        "sweep_hub_judge": (["sweep", str(sweep_yaml), "judge=hf:gpt2-large", f"reference.sources.owt={OWT_VAL}",
                             f"out_dir={tmp / 'sweep_hf'}"],
                            "gpt2-large is not in the local Hugging Face cache", tmp / "sweep_hf" / "results.jsonl"),
        "optimise_missing_sweep": (["optimise", "--analysis", str(analysed), "--sweep", str(tmp / "no_sweep"),
                                    "--saving", "0.25", "--out", str(tmp / "o1")], "holds no sweep results",
                                   tmp / "o1"),
        "optimise_steps_zero": (["optimise", "--analysis", str(analysed), "--steps", "0", "--saving", "0.25",
                                 "--out", str(tmp / "o2")], "--steps=0 must be in [1, 1,000,000]", tmp / "o2"),
        "analyze_out_exists": ([*analyze, "--out", str(analysed)], "already holds a per-step analysis",
                               analysed / "per_step.json"),
        "analyze_too_many_blocks": ([*analyze, "--num-blocks", "100000", "--out", str(tmp / "a2")],
                                    "asks for more blocks than", tmp / "a2"),
        "train_truncated_xz": (_train_words(tmp / "t1", tmp / "c1", f"data.train=[{bad['truncated']}]"),
                               f"{bad['truncated']} is not an xz file or is cut short", tmp / "t1"),
        "train_not_xz": (_train_words(tmp / "t2", tmp / "c2", f"data.train=[{bad['not_xz']}]"),
                         f"{bad['not_xz']} is not an xz file", tmp / "t2"),
        "train_not_utf8": (_train_words(tmp / "t3", tmp / "c3", f"data.train=[{bad['latin1']}]"),
                           f"{bad['latin1']}:3 is not UTF-8 text (byte 0xe9", tmp / "t3"),
        "train_out_under_a_file": (_train_words(blocker / "run", tmp / "c4"),
                                   f"train.out_dir={blocker / 'run'} cannot be a folder: {blocker} is a file",
                                   tmp / "c4"),  # refused before tokenising: no data cache
        "override_not_yaml": (_train_words(tmp / "t5", tmp / "c6", "data.train=[${data.root}/a,b]"),
                              "is not valid YAML", tmp / "t5"),
        "option_between_config_words": (["train", "model=tiny", "--no-progres", "train.steps=2"],
                                        "unrecognized arguments: --no-progres", tmp / "nothing"),
        "prompts_not_utf8": ([*sample, "--prompts-file", str(bad["latin1_prompts"]), "--out", str(tmp / "s1")],
                             f"{bad['latin1_prompts']}:3 is not UTF-8 text", tmp / "s1"),
        "sample_out_under_a_file": ([*sample, "--out", str(blocker / "samples")],
                                    f"out_dir={blocker / 'samples'} cannot be a folder", tmp / "s2"),
        "config_and_weights_disagree": (["sample", "--model", f"large={grown}", "--steps", "8", "--out",
                                         str(tmp / "s3")], "has no weight 'blocks.4.", tmp / "s3"),
        "analysis_data_truncated": (["analyze", "--model", f"small={small}", "--model", f"large={large}",
                                     "--steps", "8", "--grid", "2", "--seq-len", "64", "--data",
                                     str(bad["truncated"]), "--cache-dir", str(tmp / "c5"), "--out", str(tmp / "a")],
                                    f"{bad['truncated']} is not an xz file or is cut short", tmp / "a"),
        "reference_not_xz": (["sweep", str(sweep_yaml)], f"{bad['not_xz']} is not an xz file",
                             tmp / "sweep_ref" / "results.jsonl"),
        "yaml_split_segments": (["sweep", str(split_yaml)], "quote it in the YAML, e.g. schedules: ['L2,H6']",
                                tmp / "sweep_split"),
        "hub_judge_offline": (["sweep", str(sweep_yaml), "judge=gpt2-large", f"reference.sources.owt={OWT_VAL}",
                               f"out_dir={tmp / 'sweep_hub'}"],
                              "gpt2-large is not in the local Hugging Face cache and the hub cannot be reached",
                              tmp / "sweep_hub" / "results.jsonl"),
    }


def _quiet(words: list[str]) -> list[str]:
    """--no-progress for every command that shows progress (optimise shows none, and has no such option)."""
    return [] if words[0] == "optimise" else ["--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, saved_models) -> dict[str, tuple[int, str, str, Path]]:
    tmp = tmp_path_factory.mktemp("bad_input")
    # The hub is this machine's port 9 (nothing listens): "cannot be reached" at once, and no traffic leaves.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp / "hf_home")}
    env.pop("HF_HUB_OFFLINE", None)
    procs = {name: (subprocess.Popen([sys.executable, "-m", "mdlm_sched", *words, *_quiet(words)], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), fragment, absent)
             for name, (words, fragment, absent) in _cases(tmp, saved_models).items()}
    return {name: (proc.wait(timeout=300), proc.stdout.read(), proc.stderr.read(), fragment, absent)
            for name, (proc, fragment, absent) in procs.items()}


@pytest.mark.parametrize("name", ["train_truncated_xz", "train_not_xz", "train_not_utf8", "train_out_under_a_file",
                                  "override_not_yaml", "option_between_config_words", "prompts_not_utf8",
                                  "sample_out_under_a_file",
                                  "config_and_weights_disagree", "analysis_data_truncated", "reference_not_xz",
                                  "yaml_split_segments", "hub_judge_offline", "train_seed_negative", "train_lr_inf",
                                  "train_batch_huge", "config_yaml_list", "sample_num_samples_not_int",
                                  "sample_prompt_too_long", "sweep_hub_judge", "optimise_missing_sweep",
                                  "optimise_steps_zero", "analyze_out_exists", "analyze_too_many_blocks"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(runs, name):
    code, stdout, stderr, fragment, absent = runs[name]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    # The run's own log records (timestamped, e.g. a data cache miss) may come first; apart from them, one line and
    # nothing else: no usage, no progress bars, no warnings (argparse's errors name the subcommand).
    lines = [line for line in stderr.strip().splitlines() if not re.match(r"\d\d:\d\d:\d\d mdlm_sched\.", line)]
    assert len(lines) == 1 and lines[0].startswith("mdlm-sched") and ": error: " in lines[0], stderr
    assert fragment in lines[0], stderr
    assert not absent.exists(), f"{absent} was written for refused input"


def test_options_between_config_words_and_a_checkpoint_without_its_weights(tmp_path, shared_data):
    words = _train_words(tmp_path / "run", tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "mdlm_sched", *words, "--no-progress", "train.steps=2",
                           "train.val_every=2", "train.ckpt_every=2"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # config words after an option are taken, in order
    assert "trained mdlm to step 2" in proc.stdout
    assert "it/s]" not in proc.stderr  # --no-progress silences every bar, the tokeniser's and transformers' too

    state = tmp_path / "run" / "checkpoints" / "step-00000002"
    (state / "model.safetensors").unlink()
    kept = {p.name: p.read_bytes() for p in state.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "mdlm_sched", *words, "train.steps=4", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mdlm-sched: error: checkpoint {state} has no model.safetensors; delete {state} and the 'latest' file "
        f"beside it to resume from an older state, or start a new train.out_dir"]
    assert {p.name: p.read_bytes() for p in state.iterdir()} == kept  # the damaged state is left for the user


def test_a_sweep_that_failed_while_setting_up_accepts_the_corrected_rerun(runs, tmp_path_factory, saved_models):
    # reference_not_xz wrote its sweep.json, then failed on the reference source before any result.
    tmp = Path(runs["reference_not_xz"][4]).parent
    assert (tmp / "sweep.json").is_file() and not (tmp / "results.jsonl").exists()
    fixed = tmp.parent / "sweep.yaml"
    proc = subprocess.run([sys.executable, "-m", "mdlm_sched", "sweep", str(fixed), f"reference.sources.owt={OWT_VAL}",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp / "results.jsonl").is_file()


def test_an_option_before_the_command_is_named(capsys):
    from mdlm_sched.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such", "sample"])
    assert exit_info.value.code == 2
    assert "unrecognized option --no-such" in capsys.readouterr().err
