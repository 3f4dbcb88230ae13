"""Direct decode steps (lucidlm/direct_decode.py) against the eager forward they stand in for.

The claim is exactness: a direct step calls the same kernels on the same values in the same order
as the forward, so its logits and the keys and values it stores are the forward's bit for bit.
Each test runs one model's decode twice, on two caches, once through `DirectDecode.step` and once
through the model's own forward (`DirectDecode.eager`), and compares with `torch.equal`. The forward
itself is held to transformers elsewhere (tests/test_cache.py on the tiny model below, the real
models' tests): whatever those prove of it holds for the direct steps. Also: which passes take the
direct path and which must not (anything observed, anything but one new position per sequence).
"""

import numpy as np
import pytest
import torch

import lucidlm
from lucidlm import direct_decode
from lucidlm.direct_decode import DirectDecode
from lucidlm.kernels import cpu_decode

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="direct steps call the AVX-512 VNNI kernels")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A tiny random Llama GGUF with Q4_1 matrices (2 heads of 32 values, 1 KV head, 256 positions)."""
    return _q4_1_file(tmp_path_factory.mktemp("direct") / "tiny.gguf", n_heads=2, n_kv_heads=1)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    """The tiny model, packed (shared: tests that change it load their own)."""
    return lucidlm.load(str(tiny_path), progress=False).model


def _q4_1_file(path, **sizes):
    """A random tiny Llama GGUF whose matrices are Q4_1 (packed: int8-dot layers)."""
    import gguf
    from test_loading_gguf import random_tiny_tensors, tiny_metadata, write_gguf

    tensors = {name: (gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
               if w.ndim == 2 else w for name, w in random_tiny_tensors(**sizes).items()}
    return write_gguf(path, tiny_metadata(**sizes), tensors)


def _ids(vocab: int, batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, size=(batch, n)))


def assert_steps_are_the_forwards(model, prompt: torch.Tensor, steps: int, valid: torch.Tensor | None = None) -> int:
    """Prefill `prompt` (B, T) into two caches, then feed the same `steps` tokens per row, one position at
    a time, through the direct step and through the forward: equal logits and caches at every step.
    Returns how many steps ran direct (all of them, or the test proves nothing)."""
    direct = model.forward
    assert isinstance(direct, DirectDecode)
    B, T = prompt.shape
    caches = [model.new_cache(B, T + steps), model.new_cache(B, T + steps)]
    feed = _ids(model.config.vocab_size, B, steps, seed=T)
    calls = 0
    with torch.inference_mode():
        for cache in caches:
            model(prompt, cache, valid)
        for t in range(steps):
            token = feed[:, t:t + 1]
            ours = model(token, caches[0])  # through DirectDecode.__call__, as generation calls it
            calls += 1
            theirs = direct.eager(token, caches[1])
            assert torch.equal(ours, theirs), f"step {t}: max difference {(ours - theirs).abs().max().item()}"
    assert caches[0].length == caches[1].length == T + steps
    for mine, reference in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        assert torch.equal(mine, reference)
    return calls


def _count_direct_steps(monkeypatch) -> list[int]:
    calls = []
    original = DirectDecode.step

    def counted(self, tokens, cache):
        calls.append(tokens.shape[0])
        return original(self, tokens, cache)

    monkeypatch.setattr(DirectDecode, "step", counted)
    return calls


def test_tiny_model_steps_are_the_forwards_bit_for_bit(tiny, monkeypatch):
    calls = _count_direct_steps(monkeypatch)
    assert_steps_are_the_forwards(tiny, _ids(tiny.config.vocab_size, 1, 20, seed=1), steps=30)
    assert len(calls) == 30  # every step went the direct way


def test_a_left_padded_batch(tiny, monkeypatch):
    """Rows of different lengths, left padding marked in `valid` at the prompt: the steps' positions and
    masks come from the cache's validity, as in the forward."""
    calls = _count_direct_steps(monkeypatch)
    prompt = _ids(tiny.config.vocab_size, 3, 12, seed=2)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :5] = False
    valid[2, :9] = False
    assert_steps_are_the_forwards(tiny, prompt, steps=15, valid=valid)
    assert calls == [3] * 15


def test_generation_is_unchanged(tiny):
    """`generate_tokens` (prefill, then steps with `last_only`) with and without the direct steps: the same
    tokens, greedy and sampled with a seed (LUCIDLM_DIRECT_DECODE=0's effect)."""
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    prompt = _ids(tiny.config.vocab_size, 1, 9, seed=3)[0].tolist()
    direct = tiny.forward

    def run(params: SamplingParams) -> list[int]:
        with torch.inference_mode():
            return [s.token_id for s in generate_tokens(tiny, prompt, make_sampler(params), max_new_tokens=40)]

    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, seed=3)):
        ours = run(params)
        tiny.forward = direct.eager
        try:
            theirs = run(params)
        finally:
            tiny.forward = direct
        assert ours == theirs and len(ours) == 40


def test_observed_steps_run_the_forward(tiny, monkeypatch):
    """A hook listener, a PyTorch forward hook and an attention layer asked for its weights each see the
    step: the direct path, which calls no hooks, must not run then."""
    calls = _count_direct_steps(monkeypatch)
    seen = []
    ids = _ids(tiny.config.vocab_size, 1, 6, seed=4)
    block = tiny.layers[1]

    def step():
        with torch.inference_mode():
            cache = tiny.new_cache(1, 8)
            tiny(ids[:, :5], cache)
            tiny(ids[:, 5:6], cache)

    block.hook_resid_post.listeners.append(lambda x, name: seen.append(("listener", x.shape[1])))
    try:
        step()
    finally:
        block.hook_resid_post.listeners.clear()
    handle = block.register_forward_hook(lambda module, args, out: seen.append(("module hook", out.shape[1])))
    try:
        step()
    finally:
        handle.remove()
    block.self_attn.explicit = True
    try:
        step()
    finally:
        block.self_attn.explicit = False
    assert calls == []
    assert seen == [("listener", 5), ("listener", 1), ("module hook", 5), ("module hook", 1)]
    step()  # nobody watching any more
    assert calls == [1]


def test_other_passes_run_the_forward(tiny, monkeypatch):
    """Prompts, several positions onto a cache (prompt lookup's check), no cache, a static cache (CUDA
    graphs'), an explicit `valid`, and passes that record gradients: none of them is a direct step."""
    calls = _count_direct_steps(monkeypatch)
    ids = _ids(tiny.config.vocab_size, 1, 12, seed=5)
    with torch.inference_mode():
        cache = tiny.new_cache(1, 16)
        tiny(ids[:, :6], cache)
        tiny(ids[:, 6:9], cache)
        tiny(ids[:, :3])
        tiny(ids[:, 9:10], cache, torch.ones(1, 1, dtype=torch.bool))
        static = tiny.new_cache(1, 16)
        static.make_static()
        tiny(ids[:, :6], static)
        tiny(ids[:, 6:7], static)
    cache = tiny.new_cache(1, 16)
    with torch.no_grad():
        tiny(ids[:, :6], cache)
    with torch.enable_grad():
        tiny(ids[:, 6:7], cache)
    assert calls == []
    # a batch of dot_linear.DENSE_FROM_ROWS rows: its matmuls take the dense path, which direct steps do not
    from lucidlm.models.dot_linear import DENSE_FROM_ROWS

    for rows in (DENSE_FROM_ROWS, DENSE_FROM_ROWS - 1):
        batch = _ids(tiny.config.vocab_size, rows, 4, seed=rows)
        with torch.inference_mode():
            cache = tiny.new_cache(rows, 4)
            tiny(batch[:, :3], cache)
            tiny(batch[:, 3:], cache)
    assert calls == [DENSE_FROM_ROWS - 1]


def test_installed_only_where_it_computes_the_forward(tmp_path, tiny, monkeypatch):
    """Installed by the loader on packed models whose every step takes the kernel path; not on float32
    models, not where the kernels cannot take the heads (8 or 16 values), not when turned off."""
    from test_loading_gguf import random_tiny_tensors, tiny_metadata, write_gguf

    from lucidlm.introspect.architecture import describe

    path = _q4_1_file(tmp_path / "q4_1.gguf", n_heads=2, n_kv_heads=1)
    packed, exact = lucidlm.load(str(path), progress=False), lucidlm.load(str(path), progress=False, dtype="float32")
    assert isinstance(packed.model.forward, DirectDecode) and not isinstance(exact.model.forward, DirectDecode)
    assert describe(packed)["decode_steps"].startswith("direct kernel calls")  # what `lucid inspect` says
    assert describe(exact)["decode_steps"] == "eager forward"
    dense = write_gguf(tmp_path / "f32.gguf", tiny_metadata(), random_tiny_tensors())  # no packed layers
    assert not isinstance(lucidlm.load(str(dense), progress=False).model.forward, DirectDecode)
    for heads in (8, 4):  # d_model 64: heads of 8 (no attention kernel) and of 16 (halves of 8 values)
        narrow = _q4_1_file(tmp_path / f"{heads}.gguf", n_heads=heads, n_kv_heads=2)
        narrow_model = lucidlm.load(str(narrow), progress=False).model
        assert narrow_model.config.head_dim == 64 // heads and not isinstance(narrow_model.forward, DirectDecode)
    assert direct_decode.install(tiny) is tiny.forward  # installing twice keeps the one there
    monkeypatch.setenv("LUCIDLM_DIRECT_DECODE", "0")
    assert not isinstance(lucidlm.load(str(path), progress=False).model.forward, DirectDecode)


def _flip_bits(weights: torch.Tensor) -> torch.Tensor:
    """Other 4-bit values in some of a packed matrix's bytes (a different weight, same layout)."""
    flipped = weights.clone()
    flipped[:, :4] ^= 0x11
    return flipped


def test_models_changed_between_generations_are_seen(tiny_path, monkeypatch):
    """Direct steps gather the model's modules and tensors again at a prompt pass when the model has
    changed: a weight replaced by a new Parameter, a packed matrix's buffer replaced, every buffer
    replaced without an assignment (what `.to()` does), a block dropped, or an MLP replaced by a
    module of another class (then every pass runs the forward, and hooks on the new module are
    called) between generations."""
    calls = _count_direct_steps(monkeypatch)
    model = lucidlm.load(str(tiny_path), progress=False).model
    prompt = _ids(model.config.vocab_size, 1, 7, seed=10)
    assert_steps_are_the_forwards(model, prompt, steps=2)
    model.norm.weight = torch.nn.Parameter(model.norm.weight.detach() * 0.5, requires_grad=False)
    assert_steps_are_the_forwards(model, prompt, steps=2)
    down = model.layers[1].mlp.down_proj
    down.weights = _flip_bits(down.weights)
    assert_steps_are_the_forwards(model, prompt, steps=2)
    model._apply(lambda t: _flip_bits(t) if t.dtype == torch.uint8 and t.dim() == 2 else t)  # as .to() does
    assert_steps_are_the_forwards(model, prompt, steps=2)
    model.layers = torch.nn.ModuleList(list(model.layers)[:1])
    assert_steps_are_the_forwards(model, prompt, steps=4)
    assert len(calls) == 12

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    model.layers[0].mlp = Zero()
    seen = []
    model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    assert_steps_are_the_forwards(model, prompt, steps=2)
    assert len(calls) == 12 and seen == [7, 7, 1, 1, 1, 1]  # (two caches: each pass twice)


def test_middle_blocks_changed_without_an_assignment_are_seen(tmp_path, monkeypatch):
    """Changes that PyTorch's registration hooks do not count: a ModuleList's `del` and `insert` (it
    rebuilds its dict), and `.to()`-like tensor swaps inside one middle block."""
    import copy

    calls = _count_direct_steps(monkeypatch)
    model = lucidlm.load(str(_q4_1_file(tmp_path / "four.gguf", n_heads=2, n_kv_heads=1, n_layers=4)),
                         progress=False).model
    prompt = _ids(model.config.vocab_size, 1, 7, seed=11)
    assert_steps_are_the_forwards(model, prompt, steps=2)
    other = copy.deepcopy(model.layers[1])
    other.mlp.down_proj.weights = _flip_bits(other.mlp.down_proj.weights)
    del model.layers[1]
    model.layers.insert(1, other)
    assert_steps_are_the_forwards(model, prompt, steps=2)
    model.layers[2]._apply(lambda t: _flip_bits(t) if t.dtype == torch.uint8 and t.dim() == 2 else t)
    assert_steps_are_the_forwards(model, prompt, steps=2)
    model.layers.insert(2, model.layers[1])  # a block twice, then one fewer: the same count of blocks
    del model.layers[4]
    assert_steps_are_the_forwards(model, prompt, steps=2)
    assert len(calls) == 8


def test_an_unchanged_model_is_not_gathered_again(tiny_path, monkeypatch):
    """Gathering costs ~2 ms (SmolLM2), added to each time to first token: a prompt pass of a model that
    has not changed since skips it, through whole generations."""
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    model = lucidlm.load(str(tiny_path), progress=False).model
    gathered = []
    original = DirectDecode.gather
    monkeypatch.setattr(DirectDecode, "gather", lambda self: gathered.append(1) or original(self))
    prompt = _ids(model.config.vocab_size, 1, 9, seed=4)[0].tolist()
    for _ in range(3):
        with torch.inference_mode():
            list(generate_tokens(model, prompt, make_sampler(SamplingParams()), max_new_tokens=5))
    assert gathered == []
    model.layers[0].mlp.down_proj.weights = _flip_bits(model.layers[0].mlp.down_proj.weights)
    with torch.inference_mode():
        list(generate_tokens(model, prompt, make_sampler(SamplingParams()), max_new_tokens=5))
    assert gathered == [1]


def test_modes_profiler_global_hooks_and_other_caches_run_the_forward(tiny, monkeypatch):
    """The kernels' direct bindings bypass PyTorch's dispatcher: a TorchDispatchMode, a TorchFunctionMode
    or the profiler would miss them, so those steps run the forward (which they see). Likewise a global
    module hook (also on a deep copy of the model) and a cache of a dtype the kernels do not read."""
    import copy

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from lucidlm.cache import KVCache

    class Dispatched(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls = _count_direct_steps(monkeypatch)
    ids = _ids(tiny.config.vocab_size, 1, 6, seed=11)

    def step(model, cache=None):
        with torch.inference_mode():
            cache = cache if cache is not None else model.new_cache(1, 8)
            model(ids[:, :5], cache)
            return model(ids[:, 5:6], cache)

    dispatched = Dispatched()
    with torch.inference_mode():
        cache = tiny.new_cache(1, 8)
        tiny(ids[:, :5], cache)
        with dispatched:
            tiny(ids[:, 5:6], cache)
    assert any("int8_dot_matmul" in op for op in dispatched.ops)  # the mode saw the kernels
    with Functions():
        step(tiny)
    with torch.profiler.profile():
        step(tiny)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        copied = copy.deepcopy(tiny)
        step(tiny)
        step(copied)
    finally:
        handle.remove()
    cfg = tiny.config
    bfloat16 = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, 8, cfg.head_dim, dtype=torch.bfloat16)
    assert step(tiny, bfloat16).shape == (1, 1, cfg.vocab_size)  # (the kernels would refuse it)
    assert calls == []
    step(tiny)
    step(copied)  # the copy's own direct steps, once nobody watches
    assert calls == [1, 1]


@pytest.mark.slow
def test_smollm2_steps_are_the_forwards(smollm_path, monkeypatch):
    calls = _count_direct_steps(monkeypatch)
    model = lucidlm.load(str(smollm_path), progress=False).model
    assert_steps_are_the_forwards(model, _ids(model.config.vocab_size, 1, 40, seed=6), steps=24)
    assert_steps_are_the_forwards(model, _ids(model.config.vocab_size, 2, 9, seed=7), steps=8)
    assert len(calls) == 32


@pytest.mark.slow
def test_gemma3_steps_are_the_forwards_across_its_window(gemma_path, monkeypatch):
    """Gemma 3: QK-norm, four norms a block, GeGLU, local layers (512-position window, their own RoPE
    base) between global ones, q/k/v of mixed bit widths in some layers. The prompt ends 6 positions
    before the window is full, so the steps cross it: local layers then cut their keys."""
    calls = _count_direct_steps(monkeypatch)
    model = lucidlm.load(str(gemma_path), progress=False).model
    assert model.config.sliding_window == 512
    assert_steps_are_the_forwards(model, _ids(model.config.vocab_size, 1, 506, seed=8), steps=12)
    assert_steps_are_the_forwards(model, _ids(model.config.vocab_size, 2, 7, seed=9), steps=6)
    assert len(calls) == 18
