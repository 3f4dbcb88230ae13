"""The HTTP layer of `lucid serve` on a tiny random model (fast, no real weights needed):
every bad request gets a 4xx in OpenAI's error format and the server keeps serving, the
guards (API key, body size, full queue) answer as documented, a client that leaves frees
its slot at once, /metrics parses with Prometheus' own parser, and a fuzz run of random
bodies never gets a 5xx. The real model's text, log-probs and concurrency are in
test_server.py.
"""

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from server_tiny_model import tiny_chat_model

import lucidlm
from lucidlm.errors import InvalidArgumentError
from lucidlm.sampling import SamplingParams
from lucidlm.server import create_app
from lucidlm.server.testing import serve_in_thread

CONTEXT = 512
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"prompt": "Hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model(seed=5, context_length=CONTEXT)


@pytest.fixture(scope="module")
def client(tiny):
    minilm = lucidlm.load("minilm-l6-v2", progress=False)  # small: loads in a fraction of a second
    with TestClient(create_app(tiny, embedding_model=minilm, max_batch=8, default_max_tokens=16)) as c:
        yield c


def assert_openai_error(response, status, param="any"):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


def metric_values(text: str) -> dict:
    """name -> {labels tuple: value}, read by prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


# ----- bad requests -----

def post(client, path_and_body, **kwargs):
    path, body = path_and_body
    return client.post(path, json=body, **kwargs)


def chat(**changes):
    return ("/v1/chat/completions", {**CHAT, **changes})


def completion(**changes):
    return ("/v1/completions", {**COMPLETION, **changes})


BAD_REQUESTS = {
    # name: ((path, body), status, param)
    "malformed json": (("/v1/completions", '{"prompt": "Hi", '), 400, None),
    "body is a list": (("/v1/completions", "[1, 2]"), 400, None),
    "missing prompt": (("/v1/completions", {"max_tokens": 4}), 400, "prompt"),
    "missing messages": (("/v1/chat/completions", {"max_tokens": 4}), 400, "messages"),
    "string temperature": (completion(temperature="0.5"), 400, "temperature"),
    "float max_tokens": (completion(max_tokens=4.0), 400, "max_tokens"),
    "bool n": (completion(n=True), 400, "n"),
    "string stream": (chat(stream="yes"), 400, "stream"),
    "number stop": (completion(stop=5), 400, "stop"),
    "messages not a list": (chat(messages="Hi"), 400, "messages"),
    "message content a number": (chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    "unknown role": (chat(messages=[{"role": "wizard", "content": "Hi"}]), 400, "messages"),
    "image content": (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                      400, "messages"),
    "unknown model": (completion(model="gpt-17"), 404, "model"),
    "empty messages": (chat(messages=[]), 400, "messages"),
    "empty prompt": (completion(prompt=""), 400, "prompt"),
    "empty prompt list": (completion(prompt=[]), 400, "prompt"),
    "max_tokens beyond the context": (completion(max_tokens=100_000), 400, "max_tokens"),
    "max_completion_tokens beyond the context": (chat(max_tokens=None, max_completion_tokens=CONTEXT),
                                                 400, "max_completion_tokens"),
    "prompt longer than the context": (completion(prompt="word " * (CONTEXT + 10)), 400, "prompt"),
    "negative max_tokens": (completion(max_tokens=-1), 400, "max_tokens"),
    "negative temperature": (chat(temperature=-0.5), 400, "temperature"),
    "infinite temperature": (("/v1/completions", '{"prompt": "Hi", "temperature": Infinity}'), 400, "temperature"),
    "top_p 0": (completion(top_p=0), 400, "top_p"),
    "top_p above 1": (chat(top_p=1.5), 400, "top_p"),
    "negative top_k": (completion(top_k=-1), 400, "top_k"),
    "min_p above 1": (completion(min_p=1.5), 400, "min_p"),
    "repetition_penalty 0": (completion(repetition_penalty=0), 400, "repetition_penalty"),
    "presence_penalty 3": (chat(presence_penalty=3), 400, "presence_penalty"),
    "frequency_penalty -2.5": (completion(frequency_penalty=-2.5), 400, "frequency_penalty"),
    "negative seed": (completion(seed=-1), 400, "seed"),
    "n 0": (completion(n=0), 400, "n"),
    "n above the batch": (completion(n=9), 400, "n"),
    "legacy logprobs 50": (completion(logprobs=50), 400, "logprobs"),
    "top_logprobs without logprobs": (chat(top_logprobs=3), 400, "top_logprobs"),
    "top_logprobs 50": (chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    "logit_bias key not an id": (completion(logit_bias={"abc": 1}), 400, "logit_bias"),
    "logit_bias id outside the vocabulary": (completion(logit_bias={"99999999": 1}), 400, "logit_bias"),
    "logit_bias infinite": (("/v1/completions", '{"prompt": "Hi", "logit_bias": {"5": -Infinity}}'),
                            400, "logit_bias"),
    # far beyond these ranges float32 logits overflow to inf and sampling fails (the batch with it)
    "logit_bias 1e308": (completion(logit_bias={"5": 1e308}, temperature=0.7), 400, "logit_bias"),
    "logit_bias -101": (completion(logit_bias={"5": -101}), 400, "logit_bias"),
    "repetition_penalty 1e-39": (completion(repetition_penalty=1e-39, temperature=0.7), 400, "repetition_penalty"),
    "user message without content": (chat(messages=[{"role": "user"}]), 400, "messages"),
    "token id outside the vocabulary": (completion(prompt=[1, 10**9]), 400, "prompt"),
    "negative token id": (completion(prompt=[[1, -3]]), 400, "prompt"),
    "echo": (completion(echo=True), 400, "echo"),
    "more prompts than the queue holds": (completion(prompt=["Hi"] * 65), 400, "prompt"),
    "embedding text beyond the encoder's context": (("/v1/embeddings", {"input": "word " * 600}), 400, "input"),
    "embeddings of token ids": (("/v1/embeddings", {"input": [[1, 2]]}), 400, "input"),
    "embeddings of an empty string": (("/v1/embeddings", {"input": ["Hi", ""]}), 400, "input"),
    "embeddings with the generator": (("/v1/embeddings", {"input": "Hi", "model": "tiny-smollm2"}), 400, "model"),
    "chat with the embedding model": (chat(model="minilm-l6-v2"), 400, "model"),
    "embeddings with other dimensions": (("/v1/embeddings", {"input": "Hi", "dimensions": 3}), 400, "dimensions"),
    "tokenize neither prompt nor messages": (("/tokenize", {}), 400, "prompt"),
    "detokenize bad id": (("/detokenize", {"tokens": [5, 123456789]}), 400, "tokens"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_openai_error(client, name):
    (path, body), status, param = BAD_REQUESTS[name]
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, status, param)
    if "context" in name:
        assert error["code"] == "context_length_exceeded"
    assert client.get("/health").json() == {"status": "ok"}


def test_an_image_part_is_named_in_the_error(client):
    """content is a string or a list of text parts: the error is the text part's (its type), not the string's."""
    body = chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    error = assert_openai_error(post(client, body), 400, "messages")
    assert "type" in error["message"] and "'text'" in error["message"]


def test_json_sent_without_its_content_type_is_told_so(client):
    """curl -d sends form encoding: the JSON object is never parsed, and the error says why."""
    response = client.post("/v1/completions", content=json.dumps(COMPLETION),
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    error = assert_openai_error(response, 415)
    assert "Content-Type: application/json" in error["message"]
    assert client.post("/v1/completions", content=json.dumps(COMPLETION)).status_code == 415  # no Content-Type at all


def test_unknown_route_and_method(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_library_validation_message_reaches_the_client(client):
    error = assert_openai_error(post(client, completion(top_p=0.0)), 400, "top_p")
    with pytest.raises(InvalidArgumentError) as library:
        SamplingParams(top_p=0.0)
    assert error["message"] == str(library.value)  # the library's own words


# ----- guards -----

def test_api_key(tiny):
    with TestClient(create_app(tiny, api_key="sekret")) as c:
        assert_openai_error(post(c, completion()), 401)
        assert_openai_error(post(c, completion(), headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(c.get("/v1/models", headers={"Authorization": "Basic sekret"}), 401)
        assert post(c, completion(), headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200  # open, for load balancers' probes
        assert_openai_error(c.get("/metrics"), 401)
        # The explorer page's files open without a key (a browser cannot send one when it opens
        # a page); everything the page then calls needs it.
        assert c.get("/").status_code == 200 and c.get("/explore/static/explorer.js").status_code == 200
        assert_openai_error(c.get("/explore/info"), 401)
        assert c.get("/explore/info", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_body_too_large(tiny):
    with TestClient(create_app(tiny, max_body_bytes=1000)) as c:
        big = json.dumps({"prompt": "x" * 2000})
        error = assert_openai_error(c.post("/v1/completions", content=big,
                                           headers={"Content-Type": "application/json"}), 413)
        assert error["code"] == "request_too_large"
        chunked = (big[i:i + 100].encode() for i in range(0, len(big), 100))  # no Content-Length
        assert_openai_error(c.post("/v1/completions", content=chunked,
                                   headers={"Content-Type": "application/json"}), 413)
        small = (part.encode() for part in ('{"prompt": "Hi", ', '"max_tokens": 2}'))
        assert c.post("/v1/completions", content=small, headers={"Content-Type": "application/json"}
                      ).status_code == 200


# ----- generation on the tiny model, against the library -----

def test_stop_strings_and_several_prompts_match_the_library(client, tiny):
    free = tiny.generate("Hello", max_new_tokens=20)
    stop = free[6:9]
    expected = tiny.generate("Hello", max_new_tokens=20, stop=[stop])
    assert len(expected) < len(free)
    body = {"prompt": ["Hello", "Goodbye"], "max_tokens": 20, "temperature": 0, "stop": stop, "n": 2}
    whole = client.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    other = tiny.generate("Goodbye", max_new_tokens=20, stop=[stop])
    assert texts == [expected, expected, other, other]
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed = {}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert [streamed[i] for i in range(4)] == texts


def test_max_tokens_zero(client):
    body = post(client, completion(max_tokens=0, temperature=0)).json()
    assert body["choices"][0]["text"] == "" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0


def test_tokenize_and_detokenize(client, tiny):
    r = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tiny.tokenizer.encode("Hello world") and r["count"] == 2
    assert r["token_strs"] == ["Hello", " world"] and r["max_model_len"] == CONTEXT
    messages = [{"role": "user", "content": "Hi"}]
    r = client.post("/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == tiny.tokenizer.encode(tiny.apply_chat_template(messages))
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == \
        tiny.apply_chat_template(messages)


def test_metrics_parse_and_count(client):
    before = metric_values(client.get("/metrics").text)
    post(client, completion(max_tokens=3, temperature=0))
    post(client, completion(temperature=-1))
    text = client.get("/metrics").text
    after = metric_values(text)  # prometheus_client's parser accepts the whole text

    def count(values, name, **labels):
        return values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    ok = dict(route="/v1/completions", status="200")
    bad = dict(route="/v1/completions", status="400")
    assert count(after, "lucid_requests_total", **ok) == count(before, "lucid_requests_total", **ok) + 1
    assert count(after, "lucid_requests_total", **bad) == count(before, "lucid_requests_total", **bad) + 1
    assert count(after, "lucid_generation_tokens_total") == count(before, "lucid_generation_tokens_total") + 3
    assert count(after, "lucid_time_to_first_token_seconds_count") == \
        count(before, "lucid_time_to_first_token_seconds_count") + 1
    for gauge in ("lucid_queue_depth", "lucid_running_requests", "lucid_batch_rows", "lucid_decode_tokens_per_second"):
        assert gauge in after
    assert "# TYPE lucid_time_to_first_token_seconds histogram" in text


def test_a_failing_model_gets_500_and_the_server_goes_on(tiny):
    broken = tiny_chat_model(seed=5, step_seconds=0.01)
    with TestClient(create_app(broken), raise_server_exceptions=False) as c:
        broken.model.failure = RuntimeError("simulated bug")  # in the prefill
        error = assert_openai_error(post(c, completion()), 500)
        assert error["type"] == "server_error" and "Traceback" not in error["message"]
        broken.model.failure = None
        with c.stream("POST", "/v1/completions", json={**COMPLETION, "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert json.loads(next(line for line in lines if line.startswith("data: "))[6:])["choices"]
            broken.model.failure = RuntimeError("simulated bug")  # in a decode step
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(rest[-2][6:])["error"]["type"] == "server_error" and rest[-1] == "data: [DONE]"
        broken.model.failure = None
        assert post(c, completion()).status_code == 200
        assert c.get("/health").json() == {"status": "ok"}


# ----- a full queue and clients that leave, on a real server -----

def _metric(base_url, name):
    return metric_values(httpx.get(base_url + "/metrics").text)[name][()]


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_full_queue_gets_429_and_a_leaving_client_frees_its_slot():
    paced = tiny_chat_model(seed=5, step_seconds=0.02)  # 50 steps/s: 400 tokens would take 8 s
    with serve_in_thread(create_app(paced, max_batch=1, max_queue=1)) as url:
        long = {"prompt": "Hi", "max_tokens": 400, "temperature": 0, "stream": True}
        waiting_result = {}

        def waiting_client():
            waiting_result["response"] = httpx.post(url + "/v1/completions", json={**COMPLETION, "temperature": 0},
                                                    timeout=30)

        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=30) as streaming:
            lines = streaming.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # running: the batch is full
            waiting = threading.Thread(target=waiting_client)
            waiting.start()
            assert _wait_for(lambda: _metric(url, "lucid_queue_depth") == 1)
            full = httpx.post(url + "/v1/completions", json=COMPLETION, timeout=30)
            error = assert_openai_error(full, 429)
            assert error["code"] == "queue_full" and full.headers["Retry-After"] == "1"
        # The streaming client has gone: its row leaves at once and the waiting request runs.
        waiting.join(timeout=10)
        assert waiting_result["response"].status_code == 200
        assert waiting_result["response"].json()["usage"]["completion_tokens"] == 4
        assert _wait_for(lambda: _metric(url, "lucid_batch_rows") == 0)
        assert _metric(url, "lucid_cancelled_requests_total") == 1
        assert _metric(url, "lucid_generation_tokens_total") < 100  # far from the 400 asked for
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_non_streaming_client_that_times_out_frees_its_slot():
    paced = tiny_chat_model(seed=5, step_seconds=0.02)
    with serve_in_thread(create_app(paced)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 400}, timeout=0.5)
        assert _wait_for(lambda: _metric(url, "lucid_cancelled_requests_total") == 1)
        assert _wait_for(lambda: _metric(url, "lucid_batch_rows") == 0)
        assert _metric(url, "lucid_generation_tokens_total") < 100


# ----- fuzzing: random bodies never get a 5xx -----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repetition_penalty", "seed", "stop", "n", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "logit_bias", "stream", "stream_options", "echo", "input", "tokens", "encoding_format"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                 "content": st.text(max_size=20) | json_values})
plausible = {
    "messages": st.lists(message, max_size=3),
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 60000), max_size=5),
    "max_tokens": st.integers(-2, 24),
    "n": st.integers(-1, 10),
    "stream": st.booleans(),
    "logprobs": st.booleans() | st.integers(-1, 25),
    "temperature": st.floats(-1, 3),
    "tokens": st.lists(st.integers(-5, 60000), max_size=5),
}
field_values = {name: plausible[name] | json_values if name in plausible else json_values for name in FIELDS}
overrides = st.dictionaries(st.sampled_from(FIELDS), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: field_values[k] for k in keys}))
VALID = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/embeddings": {"input": "Hi"},
         "/tokenize": {"prompt": "Hi"}, "/detokenize": {"tokens": [5, 6]}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(path=st.sampled_from(list(VALID)), changes=overrides, raw=st.none() | json_values)
def test_fuzz_never_5xx(client, path, changes, raw):
    """A valid body with a few fields replaced by plausible or random values, or (raw) any JSON value."""
    body = {**VALID[path], **changes} if raw is None else raw
    response = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)


def test_still_healthy_after_fuzzing(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert post(client, completion(temperature=0)).status_code == 200
