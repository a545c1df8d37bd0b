"""Captured CUDA graphs of the network. The graphs themselves need a GPU (those tests are skipped on a machine
without CUDA, such as CI's); the paths that run the network directly are tested everywhere.

Run on the GPU machine with `python -m pytest -o addopts="" tests/test_cudagraph.py`.
"""

from __future__ import annotations

import pytest
import torch

from mdlm_sched.cudagraph import GraphedHidden
from mdlm_sched.modelset import PreparedDenoiser
from mdlm_sched.models.denoiser import DenoiserConfig, MDLMDenoiser
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
