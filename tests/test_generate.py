"""The generation loop and text streaming on the real model, checked against the reference
(HF transformers' greedy generate with EOS) and against the definitions of stop strings,
seeds and context limits."""

import pytest
import torch

from lucidlm.errors import ContextOverflowError, InvalidArgumentError

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answer_equals_reference_and_stops_at_eos(lucid_smollm, hf_smollm_model, hf_smollm_tokenizer):
    ids = hf_smollm_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.inference_mode():
        out = hf_smollm_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=48, do_sample=False, eos_token_id=hf_smollm_tokenizer.eos_token_id,
                                       pad_token_id=hf_smollm_tokenizer.eos_token_id)
    new = out[0, len(ids):].tolist()
    assert new[-1] == hf_smollm_tokenizer.eos_token_id, "reference did not stop: pick a shorter question"
    expected = hf_smollm_tokenizer.decode(new, skip_special_tokens=True)
    assert lucid_smollm.chat(MESSAGES, max_new_tokens=48) == expected
    stats = lucid_smollm.last_stats
    assert stats.finish_reason == "stop"
    assert stats.prompt_tokens == len(ids)
    assert stats.token_ids == new[:-1]
    assert "Paris" in expected


def test_stream_pieces_join_to_generate(lucid_smollm):
    prompt = "Once upon a time, in a small village,"
    pieces = list(lucid_smollm.stream(prompt, max_new_tokens=24))
    assert len(pieces) > 1
    assert "".join(pieces) == lucid_smollm.generate(prompt, max_new_tokens=24)
    stats = lucid_smollm.last_stats
    assert stats.new_tokens == 24 and stats.finish_reason == "length"
    assert stats.time_to_first_token > 0 and stats.decode_tokens_per_second > 0


def test_stop_string_cuts_text_before_it(lucid_smollm):
    prompt = "Once upon a time, in a small village,"
    full = lucid_smollm.generate(prompt, max_new_tokens=30)
    stop = full[12:16]  # a stop string that appears mid-completion
    cut = full.find(stop)
    pieces = list(lucid_smollm.stream(prompt, max_new_tokens=30, stop=[stop, "never-appears"]))
    assert "".join(pieces) == full[:cut]
    assert lucid_smollm.last_stats.finish_reason == "stop"


def test_uncached_generation_gives_the_same_text(lucid_smollm):
    prompt = "The three primary colours are"
    assert lucid_smollm.generate(prompt, max_new_tokens=12, use_cache=False) == \
        lucid_smollm.generate(prompt, max_new_tokens=12)


def test_seed_reproduces_a_sampled_run(lucid_smollm):
    prompt = "My favourite animal is"
    a = lucid_smollm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=7)
    b = lucid_smollm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=7)
    c = lucid_smollm.generate(prompt, max_new_tokens=20, temperature=1.0, seed=8)
    assert a == b
    assert a != c  # 20 tokens at T=1 from different streams: equal with negligible probability


def test_bad_generation_input_is_a_clear_error(lucid_smollm):
    with pytest.raises(InvalidArgumentError, match="empty"):
        lucid_smollm.generate("", max_new_tokens=4)
    with pytest.raises(ContextOverflowError, match="context length"):
        lucid_smollm.generate("Hello", max_new_tokens=lucid_smollm.config.context_length)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        lucid_smollm.generate("Hello", temperature=-0.5)
    with pytest.raises(InvalidArgumentError, match="top_p"):
        lucid_smollm.generate("Hello", top_p=0)
    with pytest.raises(InvalidArgumentError, match="top_k"):
        lucid_smollm.generate("Hello", top_k=-1)


@pytest.mark.parametrize("messages", [
    MESSAGES,
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 日本語 please 🎨"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_reference(lucid_smollm, hf_smollm_tokenizer, messages, add_generation_prompt):
    expected = hf_smollm_tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
    assert lucid_smollm.apply_chat_template(messages, add_generation_prompt) == expected


@pytest.mark.parametrize(("messages", "message"), [
    ([{"role": "wizard", "content": "Hi"}], "unknown role 'wizard'"),
    ([{"role": "user"}], "string 'role' and 'content'"),
    ([], "messages is empty"),
])
def test_chat_messages_are_checked(lucid_smollm, messages, message):
    with pytest.raises(InvalidArgumentError, match=message):
        lucid_smollm.apply_chat_template(messages)


def test_prompt_lookup_keeps_the_greedy_answer_when_it_quotes_the_prompt(lucid_smollm):
    """A reply that copies most of its prompt: looked-up guesses are confirmed, the text is the same."""
    messages = [{"role": "user", "content": "Fix the spelling mistakes in this paragraph and return it: The printing "
                 "pres was invented by Johannes Gutenberg around 1440. It alowed books to be produced quikly and "
                 "cheaply, and it spread acros Europe within a few decades."}]
    plain = lucid_smollm.chat(messages, max_new_tokens=60)
    plain_ids = lucid_smollm.last_stats.token_ids
    assert lucid_smollm.chat(messages, max_new_tokens=60, prompt_lookup=4) == plain
    stats = lucid_smollm.last_stats
    assert stats.token_ids == plain_ids
    assert stats.drafted_tokens > len(plain_ids) // 3, "the reply quotes the prompt: most guesses should hold"
