"""Batched generation (lucidlm.batch) against one-by-one greedy generation by Hugging Face
transformers on the same weights: a tiny random Llama, and SmolLM2.

Every sequence in a batch must get exactly the token ids it gets alone, whatever the
lengths of its neighbours, when they leave, and when it joins.
"""

import pytest
import torch
from tiny_decoding_model import tiny_pair

from lucidlm.batch import BatchGenerator, generate_batch
from lucidlm.errors import InvalidArgumentError
from lucidlm.sampling import SamplingParams, make_sampler

EOS = 5
PROMPTS = [[7], [20, 33, 41], list(range(10, 27)), [(i * 37) % 90 + 6 for i in range(60)]]  # 1, 3, 17, 60 tokens


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair(seed=1, eos_id=EOS, boost=1.5)


def hf_greedy(hf, prompt, max_new_tokens, eos_id=None):
    """HF's greedy continuation of one unpadded prompt, up to and including EOS."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=0)
    ids = out[0, len(prompt):].tolist()
    eos_ids = [] if eos_id is None else eos_id if isinstance(eos_id, list) else [eos_id]
    end = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids) - 1)
    return ids[: end + 1]


def run(generator, joins=None):
    """Step the generator to the end; joins: {step number: callable adding requests}."""
    joins, out, step = joins or {}, {}, 0
    while generator.active or any(s >= step for s in joins):
        if step in joins:
            joins[step]()
        for event in generator.step():
            out.setdefault(event.request_id, []).append(event.step.token_id)
        step += 1
    return out


def test_batch_of_different_lengths_equals_one_by_one(tiny):
    hf, ours = tiny
    limits = [12, 4, 12, 9]  # the 3-token prompt leaves early by length
    expected = [hf_greedy(hf, p, n, EOS) for p, n in zip(PROMPTS, limits)]
    generator = BatchGenerator(ours)
    ids = [generator.add(p, make_sampler(SamplingParams()), n, stop_ids={EOS}) for p, n in zip(PROMPTS, limits)]
    out = run(generator)
    assert [out[i] for i in ids] == expected
    assert any(e[-1] == EOS and len(e) < n for e, n in zip(expected, limits)), "no sequence stopped on EOS"


def test_generate_batch_without_stop_ids(tiny):
    hf, ours = tiny
    assert generate_batch(ours, PROMPTS, 6) == [hf_greedy(hf, p, 6) for p in PROMPTS]


def test_prompts_joining_mid_way(tiny):
    """A long prompt joins a batch shorter than itself (the batch is shifted right), then a
    short one joins (it is left-padded), while earlier sequences are leaving."""
    hf, ours = tiny
    generator = BatchGenerator(ours)
    greedy = SamplingParams()
    requests = {}  # request id -> (prompt, max_new_tokens)

    def add(prompt, n):
        requests[generator.add(prompt, make_sampler(greedy), n, stop_ids={EOS})] = (prompt, n)

    add(PROMPTS[1], 10)
    add(PROMPTS[0], 3)
    out = run(generator, joins={2: lambda: add(PROMPTS[3], 8), 5: lambda: add(PROMPTS[0] + [44], 7),
                                6: lambda: add(PROMPTS[2], 5)})
    assert len(out) == 5
    for request_id, (prompt, n) in requests.items():
        assert out[request_id] == hf_greedy(hf, prompt, n, EOS), (prompt, n)


def test_padding_is_dropped_when_the_long_prompt_leaves(tiny):
    _, ours = tiny
    generator = BatchGenerator(ours)
    generator.add(PROMPTS[3], make_sampler(SamplingParams()), 1)
    generator.add(PROMPTS[1], make_sampler(SamplingParams()), 5)
    assert generator.cache.length == 60
    generator.step()  # the 60-token prompt leaves after one token
    assert generator.cache.batch_size == 1
    assert generator.cache.length == len(PROMPTS[1]) + 1
    assert bool(generator.cache.valid[:, : generator.cache.length].all())


def test_n_samples_share_one_prefill(tiny):
    hf, ours = tiny
    calls = []
    handle = ours.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        generator = BatchGenerator(ours)
        generator.add(PROMPTS[2], make_sampler(SamplingParams(temperature=1.5, seed=3)), 6, n=4)
        events = [e for _ in range(6) for e in generator.step()]
    finally:
        handle.remove()
    assert calls[0] == (1, len(PROMPTS[2]))  # one prefill, batch 1
    assert all(shape[1] == 1 for shape in calls[1:])  # then decode steps only
    samples = {i: [e.step for e in events if e.sample_index == i] for i in range(4)}
    assert len({tuple(s.token_id for s in steps) for steps in samples.values()}) > 1, "samples are not independent"
    for steps in samples.values():
        ids = [s.token_id for s in steps]
        with torch.inference_mode():
            logits = hf(torch.tensor([PROMPTS[2] + ids])).logits[0, len(PROMPTS[2]) - 1: -1]
        torch.testing.assert_close(torch.stack([s.logprobs for s in steps]), torch.log_softmax(logits, -1),
                                   atol=1e-4, rtol=0)


def test_n_must_be_positive(tiny):
    _, ours = tiny
    with pytest.raises(InvalidArgumentError, match="n must be"):
        BatchGenerator(ours).add(PROMPTS[0], make_sampler(SamplingParams()), 4, n=0)


@pytest.mark.slow
def test_batch_equals_one_by_one_smollm(lucid_smollm, hf_smollm_model, hf_smollm_tokenizer):
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "Hi"]
    prompts = [hf_smollm_tokenizer(t).input_ids for t in texts]
    limits = [6, 4, 5]
    generator = BatchGenerator(lucid_smollm.model)
    requests = {}

    def add(i):
        requests[generator.add(prompts[i], make_sampler(SamplingParams()), limits[i], lucid_smollm.stop_ids)] = i

    add(0)
    add(2)
    out = run(generator, joins={2: lambda: add(1)})  # the longest prompt joins after two steps
    for request_id, i in requests.items():
        assert out[request_id] == hf_greedy(hf_smollm_model, prompts[i], limits[i], sorted(lucid_smollm.stop_ids)), \
            texts[i]
