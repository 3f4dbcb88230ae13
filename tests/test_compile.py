"""torch.compile'd decode steps (`lucidlm.compile`) compute what transformers computes.

Tiny random Llamas (weights shared with HF transformers, tests/tiny_llama.py) decode through
the compiled graph and must give HF's logits at every step (float32; the compiled graph fuses
and reorders float32 arithmetic, observed max |Δ| ~1e-6 on logits of size ~10). Two models
compiled in one process must not share each other's weights or layer indices (Dynamo keys its
cache on the code object, and we drop some of its guards). Observed runs (hook listeners,
explicit attention) must take the eager path. Compilation itself takes ~10-30 s per graph on
2 cores, so the whole file is marked slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lucidlm.compile import CompiledDecode, compile_decode
from lucidlm.errors import InvalidArgumentError
from lucidlm.introspect import hooks_attached
from tiny_llama import TINY, decode_logits, hf_logits, tiny_llama_pair

pytestmark = pytest.mark.slow

ATOL = 1e-4


@pytest.fixture(scope="module")
def pairs():
    """Two (hf, ours) pairs with different weights; ours compiled."""
    made = [tiny_llama_pair(seed) for seed in (0, 1)]
    for _, ours in made:
        compile_decode(ours, progress=False)
    return made


PROMPT = [5, 17, 33, 2, 90, 41]
CONTINUATION = [7, 7, 60, 12, 88, 3, 19, 50, 1, 64]


def test_compiled_decode_matches_transformers(pairs):
    hf, ours = pairs[0]
    actual = decode_logits(ours, PROMPT, CONTINUATION)
    assert ours.forward.state == "compiled"
    expected = hf_logits(hf, PROMPT + CONTINUATION)[len(PROMPT) - 1:]
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_prompt_lookup_runs_both_graphs_on_one_cache(pairs):
    """Single-position steps and prompt lookup's checking passes (a token and its guesses) run
    through two compiled graphs, taking turns on one cache, and give transformers' greedy tokens."""
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    hf, ours = pairs[0]
    prompt = PROMPT + PROMPT + PROMPT[:3]  # repeats: guesses from the first pass on
    ids = list(prompt)  # grown by HF's greedy choice, token by token
    for _ in range(20):
        ids.append(int(hf_logits(hf, ids)[-1].argmax()))
    steps = list(generate_tokens(ours, prompt, make_sampler(SamplingParams()), 20, prompt_lookup=3))
    assert ours.forward.graph_kinds == {"one position", "several positions"}
    assert [s.token_id for s in steps] == ids[len(prompt):]
    assert any(s.drafted for s in steps) and not all(s.drafted for s in steps[1:])


def test_two_compiled_models_keep_their_own_weights(pairs):
    # Interleave the two models' decode steps: a graph reused with the other model's weights
    # or layer indices would show up as a mismatch with that model's HF twin.
    (hf_a, a), (hf_b, b) = pairs
    ids_a, ids_b = PROMPT[:], [9, 8, 7, 6]
    with torch.inference_mode():
        cache_a, cache_b = a.new_cache(1, 32), b.new_cache(1, 32)
        got_a, got_b = [a(torch.tensor([ids_a]), cache_a)[0, -1]], [b(torch.tensor([ids_b]), cache_b)[0, -1]]
        for token in CONTINUATION[:6]:
            ids_a.append(token)
            ids_b.append((token * 3) % TINY["vocab_size"])
            got_a.append(a(torch.tensor([[ids_a[-1]]]), cache_a)[0, -1])
            got_b.append(b(torch.tensor([[ids_b[-1]]]), cache_b)[0, -1])
    torch.testing.assert_close(torch.stack(got_a), hf_logits(hf_a, ids_a)[len(PROMPT) - 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(got_b), hf_logits(hf_b, ids_b)[3:], atol=ATOL, rtol=0)


def test_padded_batch_decode_matches_transformers(pairs):
    # Two prompts of different lengths, left-padded into one batch, decoded together: each row
    # must equal HF on that row's unpadded sequence.
    hf, ours = pairs[0]
    rows = [[3, 14, 15, 92, 65], [35, 89]]
    steps = [[79, 32], [38, 46], [26, 43]]
    width = max(map(len, rows))
    tokens = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    with torch.inference_mode():
        cache = ours.new_cache(2, width + len(steps))
        got = [ours(tokens, cache, valid, last_only=True)[:, -1]]
        for step in steps:
            got.append(ours(torch.tensor(step)[:, None], cache)[:, -1])
    got = torch.stack(got, dim=1)  # (2, 1 + steps, V)
    for b, row in enumerate(rows):
        full = row + [step[b] for step in steps]
        torch.testing.assert_close(got[b], hf_logits(hf, full)[len(row) - 1:], atol=ATOL, rtol=0)


def test_listeners_take_the_eager_path(pairs, monkeypatch):
    hf, ours = pairs[0]
    decode_logits(ours, PROMPT, CONTINUATION[:1])  # compiled by now, whichever tests ran before
    calls = []
    compiled = ours.forward.compiled
    monkeypatch.setattr(ours.forward, "compiled", lambda *a, **k: calls.append(1) or compiled(*a, **k))
    seen = {}
    with torch.inference_mode():
        cache = ours.new_cache(1, 16)
        ours(torch.tensor([PROMPT]), cache)
        ours(torch.tensor([[CONTINUATION[0]]]), cache)  # nobody listening: the compiled graph
        with hooks_attached(ours, {"blocks.1.hook_resid_post": lambda x, name: seen.setdefault(name, x.clone())}):
            logits = ours(torch.tensor([[CONTINUATION[1]]]), cache)[0, -1]  # a listener: eager
    assert len(calls) == 1
    # What the listener saw at the decode step is HF's hidden state at that position.
    ids = PROMPT + CONTINUATION[:2]
    with torch.inference_mode():
        hf_out = hf(torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"][0, -1], hf_out.hidden_states[2][0, -1],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, hf_out.logits[0, -1].float(), atol=ATOL, rtol=0)


def test_module_hooks_take_the_eager_path(pairs):
    # Contrastive search reads the final norm's output through a PyTorch forward hook; a
    # compiled graph would skip the hook and leave stale hidden states behind.
    from test_search import brute_force_contrastive

    from lucidlm.search import contrastive_search_tokens

    hf, ours = pairs[0]
    with torch.inference_mode():  # compile the steps of a 4-row batch (contrastive search's shape) hook-free
        cache = ours.new_cache(4, 8)
        ours(torch.tensor([[1, 2]] * 4), cache)
        ours(torch.tensor([[3]] * 4), cache)
    actual = [s.token_id for s in contrastive_search_tokens(ours, PROMPT, 6, 0.6, 4)]
    assert actual == brute_force_contrastive(hf, PROMPT, 6, 0.6, 4)


def test_compile_decode_is_idempotent(pairs):
    _, ours = pairs[0]
    assert isinstance(ours.forward, CompiledDecode)
    assert compile_decode(ours, progress=False) is ours.forward


def test_warm_up_leaves_nothing_to_compile_for_requests(pairs):
    from torch._dynamo.utils import counters

    from lucidlm.compile import warm_up
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    _, ours = pairs[1]
    warm_up(ours)
    graphs = counters["stats"]["unique_graphs"]
    for prompt in ([4, 5, 6], [9] * 12):  # batch 1, any prompt of 2+ tokens
        list(generate_tokens(ours, prompt, make_sampler(SamplingParams()), 4))
    with torch.inference_mode():  # a batch of 3
        cache = ours.new_cache(3, 8)
        ours(torch.tensor([[1, 2], [3, 4], [5, 6]]), cache)
        ours(torch.tensor([[7], [8], [9]]), cache)
    assert counters["stats"]["unique_graphs"] == graphs


def test_cli_bench_compile_reports_compilation(tmp_path):
    from test_cli import lucid
    from test_loading_gguf import write_tiny_model

    path = write_tiny_model(tmp_path / "tiny.gguf", context_length=160)  # bench prompts are 128 tokens
    result, _ = lucid("bench", "--model", str(path), "--dtype", "float32", "--compile", "--runs", "1",
                      "--decode-tokens", "4", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["compile_seconds"] > 0 and report["decode_tokens_per_second"] > 0


def test_compiling_an_encoder_is_refused():
    import lucidlm
    from lucidlm.loading.catalogue import CATALOGUE

    if not CATALOGUE["minilm-l6-v2"].locate():
        pytest.skip("MiniLM package not installed")
    with pytest.raises(InvalidArgumentError, match="encoder"):
        lucidlm.load("minilm-l6-v2", progress=False, compile=True)


def test_smollm_packed_compiled_steps_match_eager(smollm_path):
    """The real model on the default (packed) path, teacher-forced on the eager greedy text.

    Packed logits lie on a bfloat16 grid (steps of 0.125 at |logit| 16-32, see models/packed.py)
    and the compiled graph rounds activations to bfloat16 at slightly different values, so the
    two paths differ by a few grid steps (observed max 0.44) and exact ties (common on the grid)
    may break differently: greedy strings are not compared. Where eager's top-2 margin exceeds
    that noise, the compiled step must pick the same token.
    """
    import lucidlm

    eager = lucidlm.load(str(smollm_path), progress=False)
    compiled = lucidlm.load(str(smollm_path), progress=False, compile=True)
    prompt = "The three primary colours are"
    ids = eager.tokenizer.encode(prompt)
    # 40 positions, so that enough have a clear margin whichever text the CPU's kernels produce
    # (8 of the first 21 did on an AVX-512 CPU)
    continuation = eager.tokenizer.encode(eager.generate(prompt, max_new_tokens=48))[:40]
    expected = decode_logits(eager.model, ids, continuation)
    actual = decode_logits(compiled.model, ids, continuation)
    assert compiled.model.forward.state == "compiled"
    torch.testing.assert_close(actual, expected, atol=0.75, rtol=0)
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.75
    assert clear.sum() >= 10
    assert torch.equal(actual.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_generation_stats_leave_compilation_out():
    # `lucid generate --compile` compiles during its first decode step: the reported decode
    # rate must not count those seconds (they are reported apart).
    import time

    from lucidlm.generate import GenerationStats, TextStream, generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    class SpacedIds:  # a stand-in for the incremental detokenizer
        push = staticmethod(lambda token_id: f"{token_id} ")
        flush = staticmethod(lambda: "")

    def stream(model) -> GenerationStats:
        stats = GenerationStats(prompt_tokens=len(PROMPT))
        steps = generate_tokens(model, PROMPT, make_sampler(SamplingParams()), 6)
        "".join(TextStream(steps, SpacedIds(), (), [], stats, time.perf_counter()))
        return stats

    _, ours = tiny_llama_pair(5)
    plain = stream(ours)
    assert plain.compile_seconds == 0 and "compiling" not in plain.summary()
    compile_decode(ours, progress=False)
    stats = stream(ours)
    assert ours.forward.state == "compiled"
    assert stats.new_tokens == 6 and 0 < stats.compile_seconds < stats.decode_seconds
    assert stats.decode_tokens_per_second == pytest.approx(5 / (stats.decode_seconds - stats.compile_seconds))
    assert f"after {stats.compile_seconds:.1f} s compiling" in stats.summary()
    assert stream(ours).compile_seconds == 0  # compiled once: the next generation pays nothing


def test_without_a_cxx_compiler_decoding_warns_and_stays_eager():
    """No working C++ compiler (Inductor's CPU backend needs one): a warning, and correct logits."""
    import torch._inductor.config as inductor_config

    hf, ours = tiny_llama_pair(2)
    # inductor_config.patch, not monkeypatch: monkeypatch's undo leaves `fx_graph_cache` hidden
    # ("does not exist") and every later compilation in the process fails.
    no_compiler = {"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}  # and no cached build to fall back on
    torch._dynamo.reset()  # nor graphs compiled by the tests above
    try:
        with inductor_config.patch(no_compiler):
            installed = compile_decode(ours, progress=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                actual = decode_logits(ours, PROMPT, CONTINUATION[:4])
    finally:
        torch._dynamo.reset()
    assert installed.state.startswith("failed") and "C++ compiler" in installed.state
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(actual, hf_logits(hf, PROMPT + CONTINUATION[:4])[len(PROMPT) - 1:], atol=ATOL, rtol=0)


def test_failure_reasons_say_what_went_wrong():
    """The warning names the cause, not Dynamo's header line (messages as PyTorch 2.13 words them)."""
    from lucidlm.compile import _failure_reason

    build = RuntimeError(
        "backend='inductor' raised:\nCppCompileError: C++ compile error\n\nCommand:\ng++ /tmp/x/k.main.cpp -O3 -o k.so\n\n"
        "Output:\n/tmp/x/k.main.cpp: In function 'void kernel(const int64_t*)':\n"
        "/tmp/x/k.main.cpp:27:41: error: 'at::vec' has not been declared\n   27 |   auto tmp9 = ...\n\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
    assert _failure_reason(build) == "CppCompileError: C++ compile error ('at::vec' has not been declared)"
    no_compiler = RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx: "
                               "('/nonexistent/g++',)\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")
    assert _failure_reason(no_compiler).startswith("InvalidCxxCompiler: No working C++ compiler found")
    assert _failure_reason(RuntimeError("")) == "RuntimeError"


def test_compiled_sliding_window_decode_matches_transformers_across_the_window(tmp_path):
    """A tiny Mistral (window 4): compiled decode steps cut the keys to the window with one formula for
    any cache length (`layers.window_of_keys`), so crossing the window needs no new graph, and every
    step gives transformers' logits."""
    from torch._dynamo.utils import counters
    from transformers import MistralConfig

    from tiny_hf import load_ours, save_tiny

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=4, bos_token_id=0, eos_token_id=0)
    hf = save_tiny(cfg, tmp_path)
    ours = load_ours(tmp_path)
    compile_decode(ours, progress=False)
    prompt, continuation = [5, 17], [7, 60, 12, 88, 3, 19, 50, 1]  # decode steps at 3..10 cache slots
    decode_logits(ours, prompt, continuation[:1])  # compiles the step's graph (at 3 slots, within the window)
    graphs = counters["stats"]["unique_graphs"]
    actual = decode_logits(ours, prompt, continuation)
    assert ours.forward.state == "compiled" and counters["stats"]["unique_graphs"] == graphs
    expected = hf_logits(hf, prompt + continuation)[len(prompt) - 1:]
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
