"""`lucid serve` with the real SmolLM2 and MiniLM, driven by the official `openai` client.

The oracles are the library's own single-request paths, themselves tested against HF
transformers: greedy text equals `LucidModel.chat` / `generate`; seeded samples equal
`generate` with the same seed; usage counts equal the tokenizer's; log-probs equal the
log-softmax of `m.logits` over the same tokens; embeddings equal `LucidModel.embed`.
16 concurrent streams must each produce their sequential greedy text while sharing one
batch. One server (a real uvicorn on a free loopback port) serves the whole module.
"""

import asyncio

import httpx
import numpy as np
import openai
import pytest
import torch

import lucidlm
from lucidlm.server import create_app
from lucidlm.server.testing import serve_in_thread

pytestmark = pytest.mark.slow

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def minilm():
    return lucidlm.load("minilm-l6-v2", progress=False)


@pytest.fixture(scope="module")
def smollm32(smollm_path):
    """float32: the exact arithmetic, where a full forward pass and step-by-step decoding agree
    to ~1e-5, so log-probs can be checked against `m.logits` tightly."""
    return lucidlm.load(str(smollm_path), progress=False, dtype="float32")


@pytest.fixture(scope="module")
def base_url(smollm32, minilm):
    with serve_in_thread(create_app(smollm32, embedding_model=minilm, model_id=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def chat_prompt_ids(m, messages):
    return m.tokenizer.encode(m.apply_chat_template(messages))


def reference_logprobs(m, prompt_ids, ids):
    """(len(ids), V) log-softmax of the model's logits at each generated position."""
    logits = m.logits(prompt_ids + ids)  # (T, V)
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(ids)]


# ----- text and usage -----

def test_chat_equals_library_greedy(client, smollm32):
    m = smollm32
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    expected = m.chat(QUESTION, max_new_tokens=16)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == m.last_stats.finish_reason
    assert r.usage.prompt_tokens == len(chat_prompt_ids(m, QUESTION))
    assert r.usage.completion_tokens == m.last_stats.new_tokens  # a final stop token counts, as generated
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.object == "chat.completion"


def test_chat_stream_equals_library_greedy(client, smollm32):
    m = smollm32
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "Why is the sky blue?"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    expected = m.chat(messages, max_new_tokens=16)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [m.last_stats.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == m.last_stats.new_tokens
    assert chunks[-1].usage.prompt_tokens == len(chat_prompt_ids(m, messages))


@pytest.mark.parametrize("stream", [False, True])
def test_completion_with_stop_string_equals_library(client, smollm32, stream):
    m, prompt = smollm32, "The three primary colours are"
    free = m.generate(prompt, max_new_tokens=16)
    stop = free.split()[3]  # a word in the middle of the greedy continuation
    expected = m.generate(prompt, max_new_tokens=16, stop=[stop])
    assert len(expected) < len(free)
    if stream:
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                                stop=[stop], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
        text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.prompt_tokens == len(m.tokenizer.encode(prompt))
    assert text == expected and reason == "stop"


def test_seeded_samples_equal_library(client, smollm32):
    m, prompt = smollm32, "Once upon a time"
    sampling = dict(temperature=0.9, top_p=0.95, seed=11)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, **sampling)
    assert r.choices[0].text == m.generate(prompt, max_new_tokens=8, **sampling)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=3, **sampling)
    expected = [c.text for c in m.generate_detailed(prompt, max_new_tokens=8, n=3, **sampling).completions]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    assert len(set(expected)) > 1  # the three samples differ


def test_penalties_equal_library(client, smollm32):
    m, prompt = smollm32, "List the days of the week: Monday, Tuesday,"
    penalties = dict(presence_penalty=0.8, frequency_penalty=0.6)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, **penalties)
    expected = m.generate(prompt, max_new_tokens=16, **penalties)
    assert r.choices[0].text == expected != m.generate(prompt, max_new_tokens=16)


# ----- log-probs -----

@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_log_softmax(client, smollm32, stream):
    m = smollm32
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    if stream:
        content = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                   if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    prompt_ids = chat_prompt_ids(m, QUESTION)
    ids = m.generate_detailed(prompt_ids, max_new_tokens=10).completions[0].token_ids
    reference = reference_logprobs(m, prompt_ids, ids)
    assert len(content) == len(ids)
    for entry, token_id, row in zip(content, ids, reference):
        assert bytes(entry.bytes) == m.tokenizer.token_bytes(token_id)
        assert entry.token == m.tokenizer.decode([token_id])
        assert entry.logprob == pytest.approx(float(row[token_id]), abs=1e-3)
        values, top_ids = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [m.tokenizer.decode([int(i)]) for i in top_ids]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-3)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [m.tokenizer.token_bytes(int(i)) for i in top_ids]


def test_streamed_legacy_logprobs_equal_log_softmax(client, smollm32):
    m, prompt = smollm32, "The capital of France is"
    tokens, token_logprobs, top_logprobs, offsets, text = [], [], [], [], ""
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=2,
                                           stream=True):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            token_logprobs += choice.logprobs.token_logprobs
            top_logprobs += choice.logprobs.top_logprobs
            offsets += choice.logprobs.text_offset
    prompt_ids = m.tokenizer.encode(prompt)
    ids = m.generate_detailed(prompt, max_new_tokens=10).completions[0].token_ids
    reference = reference_logprobs(m, prompt_ids, ids)
    assert text == m.tokenizer.decode(ids) and "".join(tokens) == text
    assert tokens == [m.tokenizer.decode([i]) for i in ids]
    assert token_logprobs == pytest.approx([float(row[i]) for row, i in zip(reference, ids)], abs=1e-3)
    assert offsets == [len(m.tokenizer.decode(ids[:k])) for k in range(len(ids))]
    for top, row in zip(top_logprobs, reference):
        values, top_ids = row.topk(2)
        expected = {m.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, top_ids)}
        assert set(expected) <= set(top) and len(top) <= 3  # the top 2, plus the chosen token if not among them
        assert [top[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-3)


# ----- concurrency -----

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def add(a, b):",
           "List three uses of copper:", "Q: What is 17 times 23?\nA:", "The printing press changed Europe because",
           "My favourite fruit is", "In 1969, the first person to walk on the Moon was",
           "Water boils at", "A good name for a cat is", "The opposite of hot is", "Photosynthesis is",
           "Once upon a time, in a small village,", "The fastest land animal is", "To make tea, first",
           "Translate to French: good morning"]


def test_sixteen_concurrent_streams_equal_sequential_greedy(base_url, smollm32):
    m, max_tokens = smollm32, 8
    expected = [m.generate(p, max_new_tokens=max_tokens) for p in PROMPTS]  # one at a time, batch 1

    def steps():
        lines = httpx.get(base_url + "/metrics").text.splitlines()
        return float(next(line for line in lines if line.startswith("lucid_decode_steps_total ")).split()[1])

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    steps_before = steps()
    outputs = asyncio.run(all_at_once())
    assert outputs == expected
    # They shared the batch: far fewer decode steps than the 128 tokens they generated.
    assert steps() - steps_before < len(PROMPTS) * max_tokens / 2


# ----- embeddings and models -----

def test_embeddings_equal_library(client, minilm):
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    expected = minilm.embed(texts).numpy()
    r = client.embeddings.create(model="minilm-l6-v2", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    r = client.embeddings.create(model="minilm-l6-v2", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(r.data[0].embedding, expected[0], atol=1e-6)
    assert r.usage.prompt_tokens == len(minilm.tokenizer.encode(texts[0])) == r.usage.total_tokens
    assert r.model == "minilm-l6-v2" and r.data[0].object == "embedding"


def test_models_and_errors_through_the_client(client):
    assert [model.id for model in client.models.list()] == [MODEL, "minilm-l6-v2"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-17", messages=QUESTION)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    assert e.value.param == "temperature" and "temperature" in e.value.message
