"""The server's engine pieces against the library's own single-sequence paths:

- `ChoiceText` (push-based, in the server) must give exactly the text, finish reason and
  token count of `generate.TextStream` (pull-based, behind `LucidModel.stream`) for any
  token sequence and stop strings;
- `BatchGenerator.remove` must leave the other rows generating exactly what they generate
  alone (`generate.generate_tokens`, itself tested against transformers);
- `Engine.run_exclusive` runs its function on the engine thread between decode steps.
"""

import asyncio
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from server_tiny_model import tiny_chat_model

from lucidlm.batch import BatchGenerator
from lucidlm.generate import GenerationStats, Step, TextStream, generate_tokens
from lucidlm.sampling import SamplingParams, make_sampler
from lucidlm.server.choices import ChoiceText
from lucidlm.server.engine import Engine, GenerationJob, QueueFullError
from lucidlm.tokenizers import IncrementalDecoder


@pytest.fixture(scope="module")
def tiny():
    return tiny_chat_model(seed=3)


# ----- ChoiceText against TextStream -----

CORPUS = "The cat sat on the mat. 🎵 Ünïcödé! \n  thing... ending; the end.\n"
STOPS = ["the", ".", "\n", "🎵", "at", " e", "ing...", "Ü", "zzz"]


def _steps(ids, vocab_size=1):
    """Steps carrying token ids; log-probs only where a test reads them (a uniform row)."""
    return [Step(i, torch.full((vocab_size,), -torch.log(torch.tensor(float(vocab_size))).item())) for i in ids]


def _through_textstream(tokenizer, ids, stop_ids, stops):
    consumed = []

    def steps():
        for step in _steps(ids):
            consumed.append(step.token_id)
            yield step

    stats = GenerationStats()
    text = "".join(TextStream(steps(), IncrementalDecoder(tokenizer), stop_ids, stops, stats, time.perf_counter()))
    return text, stats.finish_reason, len(consumed)


def _through_choicetext(tokenizer, ids, stop_ids, stops):
    choice = ChoiceText(0, tokenizer, stop_ids, tuple(stops), logprobs=None)
    parts, reason = [], None
    for k, step in enumerate(_steps(ids)):
        last = k == len(ids) - 1
        batch_reason = "stop" if step.token_id in stop_ids else "length" if last else None
        delta = choice.push(step, batch_reason)
        if delta is not None:
            parts.append(delta.text)
            reason = delta.finish_reason
        if choice.finished:
            break
    return "".join(parts), reason, choice.generated


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_choice_text_equals_text_stream(tiny, data):
    tok = tiny.tokenizer
    pool = tok.encode(CORPUS) + [2]  # 2 = <|im_end|>, a stop id
    ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=30))
    stops = data.draw(st.lists(st.sampled_from(STOPS), max_size=3))
    expected = _through_textstream(tok, ids, {2}, stops)
    assert _through_choicetext(tok, ids, {2}, stops) == expected


def test_choice_text_holds_back_a_possible_stop_string_and_splits_characters_safely(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("Hi 🎵 the end")
    choice = ChoiceText(0, tok, set(), ("the end",), logprobs=2)
    deltas = [choice.push(s, None) for s in _steps(ids, tok.vocab_size)]
    text = "".join(d.text for d in deltas if d is not None)
    assert text == "Hi 🎵 "  # the stop string and the text held back for it are not sent
    assert all("\ufffd" not in d.text for d in deltas if d is not None)  # no half characters
    assert choice.finish_reason == "stop"
    sent_tokens = [t for d in deltas if d is not None for t in d.tokens]
    # The tokens sent are those the text needs: " the" gave the text its last space.
    spelled = [b"".join(t.bytes for t in sent_tokens[:k]).decode() for k in (len(sent_tokens) - 1, len(sent_tokens))]
    assert spelled[1].startswith("Hi 🎵 ") and not spelled[0].startswith("Hi 🎵 ")
    assert [t.offset for t in sent_tokens] == sorted(t.offset for t in sent_tokens)


# ----- BatchGenerator.remove -----

def _alone(model, prompt, n):
    return [s.token_id for s in generate_tokens(model, prompt, make_sampler(SamplingParams()), n)]


def test_removed_rows_leave_the_others_unchanged(tiny):
    model = tiny.model
    prompts = [[5, 900, 77], list(range(300, 317)), [42], list(range(1000, 1040))]
    generator = BatchGenerator(model)
    ids = [generator.add(p, make_sampler(SamplingParams()), 12) for p in prompts]
    out = {i: [] for i in ids}
    step = 0
    while generator.active:
        if step == 3:
            assert generator.remove(ids[3]) == 1  # the longest prompt leaves: padding is trimmed
        if step == 5:
            assert generator.remove(ids[0]) == 1
            assert generator.remove(ids[0]) == 0
        for event in generator.step():
            out[event.request_id].append(event.step.token_id)
        step += 1
    assert out[ids[1]] == _alone(model, prompts[1], 12)
    assert out[ids[2]] == _alone(model, prompts[2], 12)
    assert out[ids[0]] == _alone(model, prompts[0], 12)[:5]
    assert out[ids[3]] == _alone(model, prompts[3], 12)[:3]


def test_remove_one_sample_of_several(tiny):
    generator = BatchGenerator(tiny.model)
    request = generator.add([7, 8, 9], make_sampler(SamplingParams(temperature=1.0, seed=1)), 6, n=3)
    generator.step()
    assert generator.remove(request, sample_index=1) == 1
    assert sorted(r.sample_index for r in generator.rows) == [0, 2]
    events = generator.step()
    assert sorted(e.sample_index for e in events) == [0, 2]


# ----- the engine -----

def test_run_exclusive_runs_between_steps_on_the_engine_thread(tiny):
    paced = tiny_chat_model(seed=3, step_seconds=0.01)
    in_forward = threading.Event()
    original = type(paced.model).forward

    def watched(self, *args, **kwargs):
        in_forward.set()
        try:
            return original(self, *args, **kwargs)
        finally:
            in_forward.clear()

    paced.model.forward = watched.__get__(paced.model)
    engine = Engine(paced, max_batch=4, max_queue=4)

    async def scenario():
        ticket = engine.submit([GenerationJob([5, 6, 7], 40)])
        seen = []

        def look():
            seen.append((threading.current_thread().name, in_forward.is_set(), engine.rows))
            return "result"

        results = []
        async for _ in ticket:
            if len(results) < 5:
                results.append(await engine.run_exclusive(look))
        with pytest.raises(ZeroDivisionError):
            await engine.run_exclusive(lambda: 1 / 0)
        return seen, results, ticket.usage

    try:
        seen, results, usage = asyncio.run(scenario())
    finally:
        engine.close()
    assert results == ["result"] * 5
    assert all(name == "lucid-engine" and not busy for name, busy, _ in seen)
    assert any(rows == 1 for _, _, rows in seen)  # it ran while the request was in the batch
    assert usage.completion_tokens == 40 and usage.prompt_tokens == 3


def test_full_queue_refuses_and_cancel_frees_the_queue(tiny):
    engine = Engine(tiny, max_batch=1, max_queue=2)
    release = threading.Event()

    async def scenario():
        blocker = asyncio.ensure_future(engine.run_exclusive(release.wait))  # the engine thread waits
        await asyncio.sleep(0.05)
        first = engine.submit([GenerationJob([5], 4)])
        second = engine.submit([GenerationJob([6], 4)])
        with pytest.raises(QueueFullError):
            engine.submit([GenerationJob([7], 4)])
        engine.cancel(second)
        third = engine.submit([GenerationJob([8], 4)])  # room again
        release.set()
        await blocker
        outputs = [[d async for d in t] for t in (first, second, third)]
        return outputs, first.usage, second.usage, third.usage

    try:
        (first, second, third), u1, u2, u3 = asyncio.run(scenario())
    finally:
        engine.close()
    assert second == [] and u2 is None  # cancelled before it started
    assert u1.completion_tokens == 4 and u3.completion_tokens == 4


def test_small_batches_decode_on_one_thread_fewer_and_prefills_on_all():
    """The engine leaves a core to the event loop during small batches' decode steps
    (engine.step_threads); prompts, big batches and run_exclusive work get every thread,
    and the caller's own thread setting is left alone."""
    tiny = tiny_chat_model(seed=3)
    passes = []
    original = tiny.model.forward

    def watched(self, tokens, *args, **kwargs):
        passes.append((tokens.shape[0], tokens.shape[1], torch.get_num_threads()))
        return original(tokens, *args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    tiny.model.forward = watched.__get__(tiny.model)
    try:
        engine = Engine(tiny, max_batch=8, max_queue=8)

        async def scenario():
            for job in (GenerationJob([5, 6, 7], 4), GenerationJob([5, 6, 7], 4, n=5)):
                ticket = engine.submit([job])
                _ = [d async for d in ticket]
            return await engine.run_exclusive(torch.get_num_threads)

        try:
            exclusive_threads = asyncio.run(scenario())
        finally:
            engine.close()
        assert torch.get_num_threads() == 3
        later = []  # a thread that starts using PyTorch afterwards gets the process's count, too
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [3]
    finally:
        torch.set_num_threads(before)
    prompts = [threads for _, length, threads in passes if length > 1]
    one_row_steps = [threads for rows, length, threads in passes if length == 1 and rows == 1]
    five_row_steps = [threads for rows, length, threads in passes if length == 1 and rows == 5]
    assert prompts == [3, 3] and exclusive_threads == 3
    assert one_row_steps == [2, 2, 2] and five_row_steps == [3, 3, 3]
