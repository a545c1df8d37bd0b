"""Captured CUDA graphs of the network. The graphs themselves need a GPU (those tests are skipped on a machine
without CUDA, such as CI's); the paths that run the network directly are tested everywhere.

Run on the GPU machine with `python -m pytest -o addopts="" tests/test_cudagraph.py`.
"""

from __future__ import annotations

import pytest
import torch

from mdlm_sched.cudagraph import GraphedHidden, GraphedLatent, padded_width
from mdlm_sched.modelset import PreparedDenoiser
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
from mdlm_sched.models.mla import rotary_cos_sin
from mdlm_sched.noise import LogLinearNoise
from mdlm_sched.sampler import sample
from mdlm_sched.sampling_config import SamplerSettings
from mdlm_sched.schedule import parse_schedule

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


KW = dict(vocab_size=300, mask_token_id=299, max_position_embeddings=32, hidden_size=64, num_attention_heads=4,
          kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, intermediate_size=256, dropout=0.0)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return {name: MDLMDenoiser(DenoiserConfig(num_hidden_layers=layers, **KW)).cuda().eval()
            for name, layers in (("small", 1), ("large", 3))}


def test_without_cuda_graph_rows_run_the_network_directly_without_autograd():
    torch.manual_seed(0)
    model = MDLMDenoiser(DenoiserConfig(num_hidden_layers=2, **KW)).eval()
    x = torch.randint(0, 299, (3, 32))
    with torch.no_grad():
        expected = model.hidden(x)
    prepared = PreparedDenoiser(model, graph_rows=8)  # on a CPU: no graphs, whatever graph_rows says
    prepared.prepare_graphs(3, 32)
    out = prepared.hidden(x)
    assert torch.equal(out, expected) and not out.requires_grad and not prepared.needs_warm_up
    calls = []
    graphed = GraphedHidden(lambda ids, sigma: calls.append(ids.shape) or model.hidden(ids, sigma), max_rows=2)
    assert torch.equal(graphed(x), expected)  # 3 > 2 sequences: the network itself, no capture
    assert calls == [(3, 32)] and not graphed.graphs


@gpu
def test_a_replay_equals_the_call_it_captured_and_its_output_is_a_copy(pair):
    plain = PreparedDenoiser(pair["large"], torch.bfloat16)
    graphed = PreparedDenoiser(pair["large"], torch.bfloat16, graph_rows=4)
    x = torch.randint(0, 299, (6, 32), device="cuda")
    first = graphed.hidden(x[:2])
    second = graphed.hidden(x[2:4])  # the same graph, other input
    assert torch.equal(first, plain.hidden(x[:2])) and torch.equal(second, plain.hidden(x[2:4]))
    assert torch.equal(graphed.hidden(x), plain.hidden(x))  # 6 > 4 sequences: no graph
    assert len(graphed._hidden.graphs) == 1
    graphed.prepare_graphs(6, 32)  # every size up to the 4 rows graphed, captured ahead of a timed run
    assert sorted(graphed._hidden.graphs) == [(n, 32, False) for n in range(1, 5)]
    assert torch.equal(graphed.hidden(x[:3]), plain.hidden(x[:3]))


@gpu
@pytest.mark.parametrize("batch", [1, 5])
def test_sampling_with_graphs_gives_the_tokens_of_the_path_without(pair, batch):
    names = ["small", "large"]
    schedule = parse_schedule("sandwich", 64, names)
    outputs = []
    for rows in (0, 8):
        models = {name: PreparedDenoiser(m, torch.bfloat16, graph_rows=rows) for name, m in pair.items()}
        outputs.append(sample(models, schedule, LogLinearNoise(1e-3), SamplerSettings(),
                              torch.Generator("cuda").manual_seed(3), batch, 32).tokens)
    assert torch.equal(outputs[0], outputs[1])
    assert not (outputs[0] == 299).any()


def _tables(model):
    return lambda length: rotary_cos_sin(length, model.config.rotary_frequencies, model.device)


def test_a_padded_latent_call_gives_the_unpadded_hidden_states_and_cache():
    # GraphedLatent pads a partial step's columns to a power of two by repeating the last; on a CPU it runs the
    # padded call directly, so the padding itself is checked here.
    torch.manual_seed(0)
    model = MDLMDenoiser(DenoiserConfig(num_hidden_layers=2, **KW)).eval()
    x = torch.randint(0, 299, (5, 32))
    cache = model.new_latent_cache(5, 32)
    with torch.no_grad():
        model.latent_hidden(x, None, cache, torch.arange(5), None)  # a refresh fills every row
    x[:, [1, 6, 9]] = torch.randint(0, 299, (5, 3))  # the columns that change; row 1 lists column 9 twice
    positions = torch.tensor([[1, 6, 9], [9, 1, 9], [6, 9, 1], [1, 9, 6], [9, 6, 1]])
    widths = []

    def recorded(ids, sigma, c, rows, cols):
        widths.append(cols.shape[1])
        with torch.no_grad():
            return model.latent_hidden(ids, sigma, c, rows, cols)

    graphed = GraphedLatent(recorded, max_rows=4, tables=_tables(model))
    for n in (2, 5):  # 5 > 4 rows: the call as given
        expected_cache, padded_cache = cache.clone(), cache.clone()
        rows = torch.arange(n)
        with torch.no_grad():
            expected = model.latent_hidden(x[:n], None, expected_cache, rows, positions[:n])
        out = graphed(x[:n], None, padded_cache, rows, positions[:n])
        assert out.shape == (n, 3, 64) and torch.allclose(out, expected, atol=1e-6, rtol=0)
        assert torch.allclose(padded_cache, expected_cache, atol=1e-6, rtol=0)
    assert widths == [4, 3] and not graphed.graphs
    assert [padded_width(a, 32) for a in (1, 2, 3, 5, 17, 32)] == [2, 2, 4, 8, 32, 32]
    assert padded_width(600, 1000) == 1000 and padded_width(1, 1) == 1  # at most the length


@pytest.mark.parametrize("batch", [1, 5])
def test_sampling_through_padded_latent_calls_gives_the_tokens_of_the_path_without(batch):
    torch.manual_seed(0)
    pair = {name: MDLMDenoiser(DenoiserConfig(num_hidden_layers=layers, **KW)).eval()
            for name, layers in (("small", 1), ("large", 2))}
    with torch.no_grad():  # the head starts at zero: give it weights, so that the tokens depend on the network
        for model in pair.values():
            model.lm_head.weight.normal_(0, 0.3)
    schedule = parse_schedule("sandwich", 48, ["small", "large"])
    settings = SamplerSettings(latent_cache=True, latent_refresh_every=4)
    tokens = []
    for graphs in (False, True):
        models = {name: PreparedDenoiser(m, graph_rows=3, latent_graphs=graphs) for name, m in pair.items()}
        tokens.append(sample(models, schedule, LogLinearNoise(1e-3), settings, torch.Generator().manual_seed(3), batch,
                             32).tokens)
    assert torch.equal(tokens[0], tokens[1]) and not (tokens[0] == 299).any()


@gpu
def test_a_latent_replay_equals_the_padded_call_it_captured(pair):
    plain = PreparedDenoiser(pair["large"], torch.bfloat16)
    graphed = PreparedDenoiser(pair["large"], torch.bfloat16, graph_rows=4, latent_graphs=True)
    x = torch.randint(0, 299, (4, 32), device="cuda")
    rows = torch.arange(4, device="cuda")
    caches = graphed.new_latent_cache(4, 32), plain.new_latent_cache(4, 32)
    assert graphed.new_latent_cache(4, 32) is caches[0]  # the one cache its graphs write
    assert torch.equal(graphed.latent_hidden(x, None, caches[0], rows, None),
                       plain.latent_hidden(x, None, caches[1], rows, None))  # a refresh
    x[:, [2, 5, 11]] = torch.randint(0, 299, (4, 3), device="cuda")
    positions = torch.tensor([[2, 5, 11]] * 4, device="cuda")
    out = graphed.latent_hidden(x, None, caches[0], rows, positions)  # padded to 4 columns and replayed
    expected = plain.latent_hidden(x, None, caches[1], rows, torch.cat((positions, positions[:, -1:]), dim=1))
    assert torch.equal(out, expected[:, :3]) and torch.equal(caches[0], caches[1])
    assert len(graphed._latent.graphs) == 2
    graphed.prepare_graphs(4, 32, latent=True)  # every row count and padded width, ahead of a timed run
    assert len(graphed._latent.graphs) == 4 * (1 + len([1, 2, 4, 8, 16, 32]))


def _gated_pair() -> dict[str, MDLMDenoiser]:
    """A gated small (1 block) and large (2 blocks) model on the CPU whose zero-initialised gates and head are drawn
    like the other weights, so that they matter."""
    torch.manual_seed(0)
    pair = {name: MDLMDenoiser(DenoiserConfig(num_hidden_layers=layers, ada_ln=True, **KW)).eval()
            for name, layers in (("small", 1), ("large", 2))}
    with torch.no_grad():
        for model in pair.values():
            for p in model.parameters():
                if not p.abs().sum():
                    p.normal_(0, 0.3)
    return pair


def test_weights_cast_once_give_the_hidden_states_logits_and_tokens_of_the_per_call_casts():
    # cast_weights stores the Linears (not the head) in the autocast dtype; CPU autocast to bfloat16 casts them
    # at every call as CUDA's does, so the two paths must agree to the bit here.
    import copy

    pair = _gated_pair()
    per_call = {name: PreparedDenoiser(m, torch.bfloat16) for name, m in pair.items()}
    cast = {name: PreparedDenoiser(copy.deepcopy(m), torch.bfloat16, cast_weights=True) for name, m in pair.items()}
    large = cast["large"].model
    assert large.blocks[0].mlp[0].weight.dtype == large.blocks[0].ada_ln.bias.dtype == torch.bfloat16
    assert large.lm_head.weight.dtype == large.norm_final.weight.dtype == torch.float32
    x = torch.randint(0, 299, (3, 32))
    hidden = per_call["large"].hidden(x)
    assert torch.equal(cast["large"].hidden(x), hidden)
    assert torch.equal(cast["large"].logits_from_hidden(hidden), per_call["large"].logits_from_hidden(hidden))
    schedule = parse_schedule("sandwich", 48, ["small", "large"])
    for settings in (SamplerSettings(), SamplerSettings(latent_cache=True, latent_refresh_every=4)):
        tokens = [sample(models, schedule, LogLinearNoise(1e-3), settings, torch.Generator().manual_seed(3), 4,
                         32).tokens for models in (per_call, cast)]
        assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_folded_modulation_gives_the_hidden_states_and_tokens_of_the_per_call_modulation(dtype):
    # fold_modulation computes each block's and the final norm's adaLN values once; a forward must then run
    # neither the time embedding nor an adaLN Linear. At batch 1 the folded values come from the matmul shapes of a
    # forward's, so hidden states and tokens must agree to the bit; at batch 3 a forward's adaLN matmul has 3 rows,
    # which may round differently in the last bit.
    import copy

    pair = _gated_pair()
    per_call = {name: PreparedDenoiser(m, dtype) for name, m in pair.items()}
    folded = {name: PreparedDenoiser(copy.deepcopy(m), dtype, fold_modulation=True) for name, m in pair.items()}
    large = folded["large"].model
    calls = []
    for module in (large.time_embed, large.final_ada_ln, *(block.ada_ln for block in large.blocks)):
        module.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randint(0, 299, (3, 32))
    assert torch.equal(folded["large"].hidden(x[:1]), per_call["large"].hidden(x[:1]))
    torch.testing.assert_close(folded["large"].hidden(x), per_call["large"].hidden(x))
    assert not calls
    schedule = parse_schedule("sandwich", 48, ["small", "large"])
    for settings in (SamplerSettings(), SamplerSettings(latent_cache=True, latent_refresh_every=4)):
        for seed in range(3):
            tokens = [sample(models, schedule, LogLinearNoise(1e-3), settings, torch.Generator().manual_seed(seed),
                             1, 32).tokens for models in (per_call, folded)]
            assert torch.equal(tokens[0], tokens[1])


def test_a_time_conditioned_model_folds_nothing():
    torch.manual_seed(0)
    model = MDLMDenoiser(DenoiserConfig(num_hidden_layers=1, time_conditioning=True, **KW)).eval()
    assert not model.fold_modulation()
    assert model.blocks[0].fixed_modulation is None and model.fixed_final_modulation is None
