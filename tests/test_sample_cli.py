"""`mdlm-sched sample` end to end on tiny saved models: outputs, run record, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mdlm_sched.cli import main
from mdlm_sched.data import load_tokenizer
from tests.conftest import REPO, TOKENIZER


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["sample", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_writes_samples_trace_and_record(saved_models, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = cli(capsys, "--model", f"small={saved_models['small']}", "--model", f"large={saved_models['large']}",
                       "--schedule", "sandwich", "--steps", "64", "--num-samples", "5", "--batch-size", "2",
                       "--seed", "7", "--prompt", "The city council", "--out", str(out_dir))
    assert code == 0
    assert "schedule sandwich = small:8,large:48,small:8" in out and "FLOPs: blocks-only" in out
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(5))  # 5 samples in batches of 2: the last batch has 1
    tok = load_tokenizer(str(TOKENIZER))
    prompt = [tok.eos_token_id, *tok.encode("The city council")]
    for s in samples:
        assert len(s["token_ids"]) == 128 and 50257 not in s["token_ids"]
        assert s["token_ids"][: len(prompt)] == prompt
        assert s["text"].startswith("<|endoftext|>The city council")
    record = json.loads((out_dir / "record.json").read_text())
    assert record["seed"] == 7 and record["config"]["batch_size"] == 2
    assert record["schedule"]["steps_per_model"] == {"small": 16, "large": 48}
    assert record["light_to_heavy"] == ["small", "large"]
    flops = record["flops"]
    assert 0 < flops["blocks_only"] < flops["baseline_blocks_only"] and 0 < flops["saving_full"] < 1
    assert set(flops["calls"]) == {"small", "large"}
    assert record["provenance"]["versions"]["torch"] == torch.__version__ and "git" in record["provenance"]
    assert record["wall_s"] > 0 and record["cache"]["sequence_steps"] == 64 * 5
    rows = (out_dir / "trace.csv").read_text().splitlines()
    assert rows[0] == "step,t,s,model,run,skipped,unmasked" and len(rows) >= 65
    assert sum(int(r.split(",")[6]) for r in rows[1:]) == 5 * (128 - len(prompt))  # each position decided once


def test_same_seed_reproduces_and_batch_of_one_model_works(saved_models, tmp_path, capsys):
    texts = []
    for run in ("a", "b"):
        code, _, _ = cli(capsys, "--model", f"large={saved_models['large']}", "--steps", "16", "--num-samples", "2",
                         "--out", str(tmp_path / run))
        assert code == 0
        texts.append((tmp_path / run / "samples.jsonl").read_text())
    assert texts[0] == texts[1]


def test_the_latent_cache_from_the_command_line(saved_models, tmp_path, capsys):
    models = ["--model", f"small={saved_models['small']}", "--model", f"large={saved_models['large']}"]
    runs = {"exact": [], "every": ["--latent-cache", "--latent-refresh-every", "1"], "cached": ["--latent-cache"]}
    for name, extra in runs.items():
        assert cli(capsys, *models, "--schedule", "sandwich", "--steps", "32", "--num-samples", "2",
                   "--out", str(tmp_path / name), *extra)[0] == 0
    samples = {name: (tmp_path / name / "samples.jsonl").read_text() for name in runs}
    record = {name: json.loads((tmp_path / name / "record.json").read_text()) for name in runs}
    assert samples["every"] == samples["exact"]  # a refresh at every step is exact sampling
    assert record["cached"]["config"]["latent_cache"] and record["cached"]["config"]["latent_refresh_every"] == 8
    assert record["cached"]["flops"]["blocks_only"] < record["exact"]["flops"]["blocks_only"]


def test_prompt_token_ids_from_a_file(saved_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"token_ids": [50256, 464, 3797]}) + "\n" + json.dumps({"text": "Hello"}) + "\n")
    code, _, _ = cli(capsys, "--model", f"large={saved_models['large']}", "--steps", "8", "--num-samples", "2",
                     "--prompts-file", str(prompts), "--out", str(tmp_path / "o"))
    assert code == 2  # texts and token ids together are refused
    prompts.write_text(json.dumps({"token_ids": [50256, 464, 3797]}) + "\n")
    code, _, _ = cli(capsys, "--model", f"large={saved_models['large']}", "--steps", "8", "--num-samples", "2",
                     "--prompts-file", str(prompts), "--out", str(tmp_path / "o"))
    assert code == 0
    for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines():
        assert json.loads(line)["token_ids"][:3] == [50256, 464, 3797]


def bad_cases(paths: dict[str, Path], tmp: Path) -> list[tuple[list[str], str]]:
    small, large = f"small={paths['small']}", f"large={paths['large']}"
    long_prompt = tmp / "long.jsonl"
    long_prompt.write_text(json.dumps({"token_ids": [464] * 128}) + "\n")
    empty_prompts = tmp / "empty.jsonl"
    empty_prompts.write_text("\n\n")
    bad_ids = tmp / "ids.jsonl"
    bad_ids.write_text(json.dumps({"token_ids": [464, 50300]}) + "\n")
    corrupt = tmp / "corrupt"
    corrupt.mkdir(exist_ok=True)
    for f in paths["large"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return [
        (["--model", large, "--prompts-file", str(long_prompt)], "prompt 0 has 128 tokens but sequences have 128"),
        (["--model", large, "--prompts-file", str(bad_ids)], "token id 50300 outside the vocabulary"),
        (["--model", large, "--steps", "0"], "steps=0 must be in [1, 1,000,000]"),
        (["--model", large, "--steps", str(10**12)], "steps=1000000000000 must be in [1, 1,000,000]"),
        (["--model", large, "--seed", "-1"], "seed=-1 must be in [0, 2147483647]"),
        (["--model", large, "--seed", str(2**63)], "seed=9223372036854775808 must be in [0, 2147483647]"),
        (["--model", large, "--prompts-file", str(empty_prompts)], "holds no prompts"),
        (["--model", "large=hf:"], "'' is not a hub repository name"),
        (["--model", "large=hf:a/b/c/d"], "'a/b/c/d' is not a hub repository name"),
        (["--model", large, "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--model", large, "--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
        (["--model", small, "--model", large, "--schedule", "sandwitch"], "is not a preset"),
        (["--model", small, "--model", large, "--schedule", "X4,H4", "--steps", "8"], "'X' names no model"),
        (["--model", f"large={tmp / 'nowhere'}"], "no model at"),
        (["--model", f"large={corrupt}"], "cannot be loaded"),
        (["--model", f"judge={paths['judge']}"], "holds a 'gpt2' model"),
        (["--model", small, "--model", f"short={paths['short']}"], "differ in max_position_embeddings"),
        (["--model", "large"], "is not NAME=PATH"),
        (["--model", large, "--num-samples", "0"], "num_samples=0 must be in [1, 10,000,000]"),
        (["--model", large, "--num-samples", str(10**12)], "num_samples=1000000000000 must be in [1, 10,000,000]"),
    ]


def test_bad_input_is_one_line_and_exit_code_2(saved_models, tmp_path, capsys):
    for args, fragment in bad_cases(saved_models, tmp_path):
        short = [] if "--steps" in args else ["--steps", "8"]  # keep the cases that get that far quick
        code, _, err = cli(capsys, *args, *short, "--out", str(tmp_path / "never"))
        lines = [line for line in err.splitlines() if line.startswith("mdlm-sched: error:")]
        assert code == 2, (args, err)
        assert len(lines) == 1 and fragment in lines[0], (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "never").exists()  # nothing written for refused input


def test_exit_code_through_the_console_script(saved_models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdlm_sched", "sample", "--model", f"large={saved_models['large']}",
                           "--steps", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "mdlm-sched: error: steps=0 must be in [1, 1,000,000] (denoising steps T)"


def test_sample_refuses_an_out_folder_that_holds_samples(saved_models, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "samples.jsonl").write_text("earlier samples\n")
    code, _, err = cli(capsys, "--model", f"large={saved_models['large']}", "--steps", "8", "--out", str(out))
    assert code == 2 and f"out_dir={out} already holds a sampling run (samples.jsonl)" in err, err
    assert (out / "samples.jsonl").read_text() == "earlier samples\n" and sorted(p.name for p in out.iterdir()) == [
        "samples.jsonl"]


def test_a_killed_sample_run_keeps_its_finished_batches_and_resumes_to_the_same_samples(saved_models, tmp_path):
    words = [sys.executable, "-m", "mdlm_sched", "sample", "--model", f"large={saved_models['large']}", "--steps",
             "1000", "--num-samples", "8", "--batch-size", "1", "--seq-len", "64", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*words, "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "batches" / "batch-000001.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    kept = sorted(p.name for p in (killed / "batches").glob("batch-*.json"))
    assert len(kept) >= 2 and not (killed / "samples.jsonl").exists(), kept
    assert len(kept) < 8, "the run finished before it was killed; the test needs slower batches"

    changed = subprocess.run([*words[:-1], "--seed", "1", "--out", str(killed)], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2 and "unfinished sampling run with other settings" in changed.stderr

    for out in (killed, tmp_path / "whole"):
        done = subprocess.run([*words, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((killed / "record.json").read_text())["resumed_batches"]
    assert resumed >= len(kept) and not (killed / "batches").exists()

    def samples(out):
        return [json.loads(line)["token_ids"] for line in (out / "samples.jsonl").read_text().splitlines()]

    assert samples(killed) == samples(tmp_path / "whole")
