"""Decode steps replayed from CUDA graphs (`lucidlm.cuda_graphs`, via `compile_decode` on a GPU)
compute what transformers computes.

Needs a CUDA GPU: skipped elsewhere (CI has none; these ran on a lent H100, see bench/RESULTS.md).
The static-cache arithmetic the graphs replay is also checked without a GPU, for every model
family, by tests/tiny_hf.py's `assert_cached_equals_uncached` and `assert_padded_batch_equals_alone`.

Tiny random Llamas (weights shared with HF transformers, tests/tiny_llama.py) run float32 on
the GPU (TF32 off, PyTorch's default for matmuls); the references run on the CPU. Observed
max |Δ| ~1e-6 on logits of size ~10.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from lucidlm.compile import compile_decode  # noqa: E402
from lucidlm.cuda_graphs import MAX_CAPTURES_PER_CACHE, DecodeGraph  # noqa: E402
from lucidlm.generate import generate_tokens  # noqa: E402
from lucidlm.introspect import hooks_attached  # noqa: E402
from lucidlm.sampling import SamplingParams, make_sampler  # noqa: E402
from lucidlm.search import BeamParams, beam_search, contrastive_search_tokens  # noqa: E402
from tiny_decoding_model import tiny_pair  # noqa: E402
from tiny_llama import TINY, decode_logits, hf_logits, tiny_llama_pair  # noqa: E402

ATOL = 1e-4
PROMPT = [5, 17, 33, 2, 90, 41]
CONTINUATION = [7, 7, 60, 12, 88, 3, 19, 50, 1, 64]


def _count_calls(monkeypatch, method: str) -> list:
    """A list that grows by one at each call of DecodeGraph.<method>."""
    counted = []
    original = getattr(DecodeGraph, method)
    monkeypatch.setattr(DecodeGraph, method, lambda self, *a: counted.append(1) or original(self, *a))
    return counted


@pytest.fixture
def replays(monkeypatch):
    """Counts graph replays."""
    return _count_calls(monkeypatch, "replay")


@pytest.fixture
def captures(monkeypatch):
    """Counts graph captures (a DecodeGraph captures as it is made)."""
    return _count_calls(monkeypatch, "__init__")


@pytest.fixture(scope="module")
def graphed():
    """Two (hf, ours) pairs with different weights; ours on the GPU with CUDA graphs, no Inductor."""
    made = []
    for seed in (0, 1):
        hf, ours = tiny_llama_pair(seed)
        ours = ours.cuda()
        compile_decode(ours, progress=False, inductor=False)
        made.append((hf, ours))
    return made


def test_graph_decode_matches_transformers(graphed, replays):
    hf, ours = graphed[0]
    actual = decode_logits(ours, PROMPT, CONTINUATION, "cuda")
    # Step 1 runs normally (and captures), steps 2..10 replay.
    assert len(replays) == len(CONTINUATION) - 1
    torch.testing.assert_close(actual, hf_logits(hf, PROMPT + CONTINUATION)[len(PROMPT) - 1:], atol=ATOL, rtol=0)


def test_two_graphed_models_and_caches_interleaved(graphed):
    # Interleave two models (and two caches of one model): a graph replayed on the wrong
    # cache or weights shows up as a mismatch with the HF twin.
    (hf_a, a), (hf_b, b) = graphed
    seqs = {"a1": PROMPT[:], "a2": [9, 8, 7], "b": [4, 4, 2, 1]}
    models = {"a1": a, "a2": a, "b": b}
    with torch.inference_mode():
        caches = {k: models[k].new_cache(1, 32) for k in seqs}
        got = {k: [models[k](torch.tensor([s], device="cuda"), caches[k])[0, -1]] for k, s in seqs.items()}
        for i, token in enumerate(CONTINUATION[:6]):
            for k in seqs:
                seqs[k].append((token + 11 * len(k) + i) % TINY["vocab_size"])
                got[k].append(models[k](torch.tensor([[seqs[k][-1]]], device="cuda"), caches[k])[0, -1])
    for k, hf in (("a1", hf_a), ("a2", hf_a), ("b", hf_b)):
        # got: after the prompt's last token, then after each of the 6 tokens fed one at a time
        torch.testing.assert_close(torch.stack(got[k]).cpu(), hf_logits(hf, seqs[k])[-7:], atol=ATOL, rtol=0)


def test_padded_batch_decode_matches_transformers(graphed, replays):
    hf, ours = graphed[0]
    rows = [[3, 14, 15, 92, 65], [35, 89]]
    steps = [[79, 32], [38, 46], [26, 43], [11, 12]]
    width = max(map(len, rows))
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows], device="cuda")
    valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device="cuda")
    with torch.inference_mode():
        cache = ours.new_cache(2, width + len(steps))
        got = [ours(tokens, cache, valid, last_only=True)[:, -1]]
        for step in steps:
            got.append(ours(torch.tensor(step, device="cuda")[:, None], cache)[:, -1])
    assert len(replays) == len(steps) - 1
    got = torch.stack(got, dim=1).cpu()  # (2, 1 + steps, V)
    for b, row in enumerate(rows):
        full = row + [step[b] for step in steps]
        torch.testing.assert_close(got[b], hf_logits(hf, full)[len(row) - 1:], atol=ATOL, rtol=0)


def test_listener_takes_the_eager_path_on_a_graphed_cache(graphed, replays):
    hf, ours = graphed[0]
    seen = {}
    with torch.inference_mode():
        cache = ours.new_cache(1, 16)
        ours(torch.tensor([PROMPT], device="cuda"), cache)
        for token in CONTINUATION[:2]:
            ours(torch.tensor([[token]], device="cuda"), cache)  # capture, then one replay
        with hooks_attached(ours, {"blocks.1.hook_resid_post": lambda x, name: seen.setdefault(name, x.clone())}):
            ours(torch.tensor([[CONTINUATION[2]]], device="cuda"), cache)  # eager, on the static cache
        after = ours(torch.tensor([[CONTINUATION[3]]], device="cuda"), cache)[0, -1]  # replays again
    assert len(replays) == 2
    ids = PROMPT + CONTINUATION[:4]
    with torch.inference_mode():
        hf_out = hf(torch.tensor([ids[:-1]]), output_hidden_states=True)
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"][0, -1].cpu(), hf_out.hidden_states[2][0, -1],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(after.cpu(), hf_logits(hf, ids)[-1], atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(graphed):
    hf, ours = graphed[1]
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                               max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
    assert [s.token_id for s in generate_tokens(ours, PROMPT, make_sampler(SamplingParams()), 20)] == expected


def test_full_cache_is_a_clear_error(graphed):
    _, ours = graphed[0]
    with torch.inference_mode():
        cache = ours.new_cache(1, len(PROMPT) + 2)
        ours(torch.tensor([PROMPT], device="cuda"), cache)
        ours(torch.tensor([[1]], device="cuda"), cache)  # capture
        ours(torch.tensor([[2]], device="cuda"), cache)  # replay: now full
        with pytest.raises(ValueError, match="KV cache holds 8 positions; 8 used, 1 more requested"):
            ours(torch.tensor([[3]], device="cuda"), cache)


@pytest.fixture(scope="module")
def search_pair():
    hf, ours = tiny_pair(seed=0, eos_id=5, boost=1.5)
    ours = ours.cuda()
    compile_decode(ours, progress=False, inductor=False)
    return hf, ours


def test_beam_search_keeps_its_graph_and_matches_transformers(search_pair, replays):
    # Beam search permutes the cache's rows every step: in place, so the graph stays valid.
    hf, ours = search_pair
    with torch.inference_mode():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          num_beams=3, do_sample=False, num_return_sequences=2, max_new_tokens=10,
                          length_penalty=1.0, early_stopping=False, output_scores=True, return_dict_in_generate=True,
                          eos_token_id=[5], pad_token_id=5, min_new_tokens=0)
    expected = []
    for sequence in out.sequences:
        ids = sequence[len(PROMPT):].tolist()
        expected.append(ids[: next((i for i, t in enumerate(ids) if t == 5), len(ids) - 1) + 1])
    hypotheses = beam_search(ours, PROMPT, 10, BeamParams(3, 1.0, False, 2), stop_ids={5})
    assert [h.token_ids for h in hypotheses] == expected
    assert len(replays) >= 5


def test_contrastive_search_runs_eagerly_and_matches_brute_force(search_pair, captures):
    # Contrastive search reads hidden states through a module hook: an observer, so no graph
    # (a replay would skip the hook and leave stale hidden states).
    from test_search import brute_force_contrastive

    hf, ours = search_pair
    actual = [s.token_id for s in contrastive_search_tokens(ours, PROMPT, 8, 0.6, 4)]
    assert actual == brute_force_contrastive(hf, PROMPT, 8, 0.6, 4)
    assert not captures


def test_a_cache_whose_batch_keeps_changing_stops_being_captured(graphed, captures):
    # Each change of batch size replaces the cache's tensors (the graph no longer fits) and
    # costs a capture; after MAX_CAPTURES_PER_CACHE the cache runs eagerly.
    hf, ours = graphed[0]
    ids, got = PROMPT[:], []
    with torch.inference_mode():
        cache = ours.new_cache(1, 32)
        ours(torch.tensor([ids], device="cuda"), cache)
        for i, token in enumerate(CONTINUATION[:6]):
            rows = 1 + i % 2
            cache.reorder(torch.zeros(rows, dtype=torch.long, device="cuda"))  # copies of row 0
            ids.append(token)
            got.append(ours(torch.tensor([[token]] * rows, device="cuda"), cache)[-1, -1])
            cache.reorder(torch.zeros(1, dtype=torch.long, device="cuda"))
    assert len(captures) == MAX_CAPTURES_PER_CACHE
    torch.testing.assert_close(torch.stack(got).cpu(), hf_logits(hf, ids)[len(PROMPT):], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_inductor_and_graphs_match_transformers():
    # torch.compile (Inductor, Triton kernels) captured into the graph: ~30 s of compilation.
    hf, ours = tiny_llama_pair(2)
    ours = ours.cuda()
    compiled = compile_decode(ours, progress=False)
    actual = decode_logits(ours, PROMPT, CONTINUATION, "cuda")
    assert compiled.state == "compiled"
    torch.testing.assert_close(actual, hf_logits(hf, PROMPT + CONTINUATION)[len(PROMPT) - 1:], atol=ATOL, rtol=0)


def test_a_step_that_cannot_be_captured_warns_and_runs_without_graphs():
    # A step that reads a GPU value on the host cannot be captured: one warning, then every
    # step runs as it is, with the right logits.
    from lucidlm.cuda_graphs import GraphedDecode

    hf, ours = tiny_llama_pair(4)
    ours = ours.cuda()

    def syncing_step(tokens, cache):
        logits = ours(tokens, cache)
        float(logits.sum())  # a device-to-host copy: not allowed while capturing
        return logits

    graphs = GraphedDecode()
    with torch.inference_mode():
        cache = ours.new_cache(1, 16)
        got = [ours(torch.tensor([PROMPT], device="cuda"), cache)[0, -1]]
        with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
            got.append(graphs(syncing_step, torch.tensor([[CONTINUATION[0]]], device="cuda"), cache)[0, -1])
        for token in CONTINUATION[1:4]:
            got.append(graphs(syncing_step, torch.tensor([[token]], device="cuda"), cache)[0, -1])
    assert graphs.failed and not graphs.graphs
    ids = PROMPT + CONTINUATION[:4]
    torch.testing.assert_close(torch.stack(got).cpu(), hf_logits(hf, ids)[len(PROMPT) - 1:], atol=ATOL, rtol=0)
