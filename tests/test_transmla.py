"""convert-mla (TransMLA for MDLMs): exact where the method is exact, error falling with the latent and rotary
widths where it is lossy, the command and its bad input, and fine-tuning a converted model (train.init)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TOKENIZER
from mdlm_sched.cli import main
from mdlm_sched.data import load_sources, load_tokenizer, tokenizer_hash
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.loading import load_denoiser
from mdlm_sched.models.transmla import convert_to_mla


def dit(kv_heads: int, time_conditioning: bool = False, seed: int = 0, **extra) -> MDLMDenoiser:
    """A float64 DiT (4 heads of 16) with weights large enough that attention matters."""
    torch.manual_seed(seed)
    config = DenoiserConfig(**{**dict(
        vocab_size=300, mask_token_id=299, max_position_embeddings=24, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, attention="mha", num_key_value_heads=kv_heads, intermediate_size=128, ada_ln=True,
        head_bias=True, cond_dim=16, dropout=0.0, time_conditioning=time_conditioning, vocab_pad_multiple=1),
        **extra})
    model = MDLMDenoiser(config).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.25)
    return model


def relative_error(source: MDLMDenoiser, converted: MDLMDenoiser, seed: int = 1) -> float:
    """Relative error of the final hidden states (float64) of the two models on the same random inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 300, (3, 24), generator=generator)
    sigma = torch.rand(3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        a, b = source.hidden(x, sigma), converted.double().hidden(x, sigma)
    return float((a - b).norm() / a.norm())


def random_moments(model: MDLMDenoiser) -> list[torch.Tensor]:
    """Anisotropic second moments [d, d] (what calibration data give), one per block."""
    generator = torch.Generator().manual_seed(5)
    d = model.config.hidden_size
    out = []
    for _ in model.blocks:
        a = torch.randn(d, d, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
        out.append(a @ a.t())
    return out


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped-query, multi-head
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_full_width_conversion_is_exact(kv_heads: int, time_conditioning: bool) -> None:
    # Every rotary pair kept (rope = G * hd) and the latent as wide as the keys left plus the values: exact, with
    # the weights alone and with calibration statistics.
    source = dit(kv_heads, time_conditioning)
    width = kv_heads * 16
    for moments in (None, random_moments(source)):
        converted = convert_to_mla(source, 2 * width, width, moments)
        assert converted.config.attention == "mla" and not converted.config.kv_norm
        assert relative_error(source, converted) < 1e-10


def test_mqa_with_one_heads_rotary_key_is_exact_at_the_value_width() -> None:
    # One kv head: the rotary key is that head's key, the latent need hold only the values.
    source = dit(1)
    assert relative_error(source, convert_to_mla(source, 16, 16)) < 1e-10


def test_error_falls_as_the_latent_and_the_rotary_key_grow() -> None:
    source = dit(4)
    moments = random_moments(source)
    # Keys fully rotary: the latent holds the values alone (4 heads x 16), exact from rank 64.
    by_rank = [relative_error(source, convert_to_mla(source, rank, 64, moments)) for rank in (8, 16, 32, 48, 64)]
    assert by_rank[0] > by_rank[1] > by_rank[2] > by_rank[3] > 1e-3 and by_rank[4] < 1e-10
    by_rope = [relative_error(source, convert_to_mla(source, 128, rope, moments)) for rope in (8, 16, 32, 64)]
    assert by_rope[0] > by_rope[1] > by_rope[2] > by_rope[3]
    assert by_rope[0] > 1e-3 and by_rope[3] < 1e-10


def test_calibration_moments_beat_the_weights_alone_on_their_data(shared_data, tmp_path) -> None:
    # The PCA under the calibration inputs' statistics keeps what those inputs use: on the same inputs, a
    # compressed conversion errs less than one that assumed isotropic inputs.
    from mdlm_sched.convert import attention_input_moments

    tokenizer = load_tokenizer(str(TOKENIZER))
    source = dit(4, vocab_size=len(tokenizer) + 1, mask_token_id=len(tokenizer),
                 tokenizer_hash=tokenizer_hash(tokenizer))
    blocks = load_sources([str(shared_data / "owt_tiny.jsonl")], tokenizer, 24, tmp_path / "cache")[:64]
    moments = attention_input_moments(source.float(), blocks, 8, torch.device("cpu"), None, progress=False)
    x = torch.from_numpy(blocks[:4].astype("int64"))
    source = source.double()
    errors = []
    for m in (None, moments):
        converted = convert_to_mla(source, 40, 32, m).double()
        with torch.no_grad():
            a, b = source.hidden(x), converted.hidden(x)
        errors.append(float((a - b).norm() / a.norm()))
    assert errors[1] < 0.8 * errors[0], errors


def test_an_mla_source_and_bad_widths_are_refused() -> None:
    from mdlm_sched.errors import ConfigError

    with pytest.raises(ConfigError, match="already uses Multi-head Latent Attention"):
        convert_to_mla(MDLMDenoiser(DenoiserConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                                   vocab_size=300, mask_token_id=299)), 32, 8)
    source = dit(2)
    for rank, rope, message in ((32, 7, "positive even"), (32, 0, "positive even"), (32, 34, "above the source's key "
                                "width"), (65, 8, r"must be in 1\.\.64"), (0, 8, r"must be in 1\.\.64")):
        with pytest.raises(ConfigError, match=message):
            convert_to_mla(source, rank, rope)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory, shared_data):
    """A tiny GQA DiT saved with the GPT-2 tokenizer (random weights)."""
    from mdlm_sched.checkpoint import export_model
    from mdlm_sched.config_load import load
    from mdlm_sched.models import build_model

    root = tmp_path_factory.mktemp("convert")
    tokenizer = load_tokenizer(str(TOKENIZER))
    torch.manual_seed(0)
    cfg = load(["model=tiny", "model.attention=mha", "model.num_key_value_heads=2", "model.ada_ln=true",
                "model.head_bias=true", "model.dropout=0", "model.max_seq_len=64", "data=owt_tiny",
                f"data.root={shared_data}", "data.seq_len=64", f"data.cache_dir={root / 'cache'}"])
    export_model(build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer_hash(tokenizer)), tokenizer,
                 root / "dit")
    return root


def test_convert_mla_command_writes_a_model_that_fine_tunes_and_shares_a_schedule(dit_folder, shared_data, tmp_path):
    from mdlm_sched.config_load import load
    from mdlm_sched.train import train

    run = [sys.executable, "-m", "mdlm_sched"]
    converted = tmp_path / "mla"
    done = subprocess.run([*run, "convert-mla", str(dit_folder / "dit"), str(converted), "--kv-lora-rank", "48",
                           "--qk-rope-head-dim", "16", "--calibration", str(shared_data / "owt_tiny.jsonl"),
                           "--calibration-blocks", "8", "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "64 key/value elements per token and block, against 64" in done.stdout  # 48 + 16 against 2 x 2 x 16
    assert "perplexity bound on the 8 calibration blocks" in done.stdout
    model = load_denoiser(converted)
    assert (model.config.kv_lora_rank, model.config.qk_rope_head_dim, model.config.kv_norm) == (48, 16, False)
    assert len(model.config.rope_frequencies) == 8

    # Fine-tuning from the converted model: its bound is validated before the first step, on the same draws.
    from mdlm_sched.errors import ConfigError

    with pytest.raises(ConfigError, match="exceeds the length of train.init"):
        train(load(["data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"data.root={shared_data}", "data.seq_len=128",
                    f"data.cache_dir={tmp_path / 'cache'}", f"train.init={converted}",
                    f"train.out_dir={tmp_path / 'long'}"]), progress=False)
    out = tmp_path / "tuned"
    train(load(["data=owt_tiny", "train=cpu_tiny", "runtime=cpu", f"data.root={shared_data}", "data.seq_len=64",
                f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.warmup_steps=1", "train.val_every=2",
                "train.ckpt_every=2", "train.val_batches=1", f"train.init={converted}", f"train.out_dir={out}"]),
          progress=False)
    vals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [0, 2]
    tuned = load_denoiser(out)
    assert tuned.config.rope_frequencies == model.config.rope_frequencies and not tuned.config.kv_norm
    assert not torch.equal(tuned.blocks[0].attn.wkv_b.weight, model.blocks[0].attn.wkv_b.weight)

    assert main(["sample", "--model", f"dit={dit_folder / 'dit'}", "--model", f"mla={out}", "--schedule", "L4,H4",
                 "--steps", "8", "--num-samples", "2", "--device", "cpu", "--out", str(tmp_path / "samples"),
                 "--no-progress"]) == 0


def test_bad_convert_mla_input_is_one_line(dit_folder, shared_data, tmp_path, capsys):
    src = str(dit_folder / "dit")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short to fill one block."}) + "\n")
    cases = {
        "mla": ([str(tmp_path / "mla-src"), str(tmp_path / "o1")], "already uses Multi-head Latent Attention"),
        "odd": ([src, str(tmp_path / "o2"), "--qk-rope-head-dim", "7"], "positive even"),
        "wide": ([src, str(tmp_path / "o3"), "--qk-rope-head-dim", "64"], "above the source's key width"),
        "rank": ([src, str(tmp_path / "o4"), "--kv-lora-rank", "65"], r"must be in 1..64"),
        "missing": ([src, str(tmp_path / "o5"), "--calibration", str(tmp_path / "nope.jsonl")], "nope.jsonl"),
        "short": ([src, str(tmp_path / "o6"), "--calibration", str(short)], "give --calibration more text"),
        "exists": ([src, str(dit_folder)], "exists"),
        "save": ([src, str(tmp_path / "o7"), "--save-every", "nan"], "--save-every nan must be a number of seconds"),
    }
    from mdlm_sched.checkpoint import export_model
    from mdlm_sched.config_load import load
    from mdlm_sched.models import build_model

    tokenizer = load_tokenizer(str(TOKENIZER))
    cfg = load(["model=tiny", "data=owt_tiny", f"data.root={shared_data}", f"data.cache_dir={tmp_path / 'cache'}"])
    export_model(build_model(cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer_hash(tokenizer)), tokenizer,
                 tmp_path / "mla-src")
    capsys.readouterr()  # the export's progress bar
    for name, (args, message) in cases.items():
        code = main(["convert-mla", "--kv-lora-rank", "32", "--qk-rope-head-dim", "8", *args,
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, name
        # The last line is the error (in-process, tqdm bars of the data loader may precede it; as a process, with
        # --no-progress, they do not).
        assert err.strip().splitlines()[-1].startswith("mdlm-sched: error: ") and "Traceback" not in err, (name, err)
        assert message in err.strip().splitlines()[-1], (name, err)
        if name != "exists":
            assert not (tmp_path / args[1].rsplit("/", 1)[-1]).exists(), name


def test_a_killed_conversion_resumes_to_the_same_model(dit_folder, shared_data, tmp_path):
    blocks = 96  # 12 batches: the kill comes at the first save, long before the last
    words = ["convert-mla", str(dit_folder / "dit"), "OUT", "--kv-lora-rank", "48", "--qk-rope-head-dim", "16",
             "--calibration", str(shared_data / "owt_tiny.jsonl"), "--calibration-blocks", str(blocks),
             "--cache-dir", str(tmp_path / "cache"), "--no-progress"]

    def at(out, *extra):
        return [w if w != "OUT" else str(out) for w in words] + list(extra)

    whole = tmp_path / "whole"
    assert main(at(whole, "--device", "cpu")) == 0  # also tokenises the data for the killed run
    assert not (tmp_path / "whole.unfinished").exists()

    killed, work = tmp_path / "killed", tmp_path / "killed.unfinished"
    proc = subprocess.Popen([sys.executable, "-m", "mdlm_sched", *at(killed, "--device", "cpu", "--save-every", "0")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (work / "moments.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    done = int(load_file(work / "moments.safetensors")["blocks_done"])
    assert not killed.exists() and 0 < done < blocks, done  # killed during the calibration, its sums kept

    assert main(at(killed, "--device", "cpu", "--kv-lora-rank", "40")) == 2  # other settings: refused, kept
    assert (work / "moments.safetensors").is_file() and not killed.exists()

    resumed = subprocess.run([sys.executable, "-m", "mdlm_sched", *at(killed, "--device", "cpu")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed an unfinished conversion: {done} of {blocks}" in resumed.stdout
    assert not work.exists()
    a, b = load_file(killed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
