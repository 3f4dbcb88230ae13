"""The Python API (lucidlm/api.py) refuses bad input with a LucidError that says what is wrong: token
ids outside the vocabulary (a negative id would otherwise wrap around to the last embedding rows),
passes longer than the context, wrong types of prompts, options and hooks. On a tiny GGUF model."""

import pytest
import torch
from test_loading_gguf import TINY, VOCAB_SIZE, write_tiny_model

import lucidlm
from lucidlm.errors import ContextOverflowError, InvalidArgumentError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return lucidlm.load(str(write_tiny_model(tmp_path_factory.mktemp("api") / "tiny.gguf")), progress=False)


TOO_LONG = [1] * (TINY["context_length"] + 1)

BAD_CALLS = {
    "negative id to generate": (lambda m: m.generate([-1]), f"in [0, {VOCAB_SIZE})"),
    "id past the vocabulary to generate": (lambda m: m.generate([VOCAB_SIZE]), f"got {VOCAB_SIZE}"),
    "negative id to logits": (lambda m: m.logits([3, -1]), "got -1"),
    "id past the vocabulary in a batch": (lambda m: m.logits(torch.tensor([[1, VOCAB_SIZE + 5]])), "got"),
    "negative id to run_with_cache": (lambda m: m.run_with_cache([-2], names="hook_embed"), "got -2"),
    "text to logits": (lambda m: m.logits("hello"), "list or a tensor of integers"),
    "float ids": (lambda m: m.logits(torch.tensor([[1.0, 2.0]])), "integers"),
    "three dimensions": (lambda m: m.logits(torch.zeros(1, 2, 3, dtype=torch.long)), "shape (T,) or (B, T)"),
    "no positions": (lambda m: m.logits(torch.zeros(1, 0, dtype=torch.long)), "T >= 1"),
    "valid of another shape": (lambda m: m.logits(torch.tensor([[1, 2]]), valid=torch.ones(3, dtype=torch.bool)),
                               "valid must be"),
    "prompt None": (lambda m: m.generate(None), "a string or a list of token ids"),
    "prompt a number": (lambda m: m.generate(123), "a string or a list of token ids"),
    "empty id list": (lambda m: m.generate([]), "the prompt is empty"),
    "fractional max_new_tokens": (lambda m: m.generate("hi", max_new_tokens=2.5), "max_new_tokens must be an integer"),
    "stop a number": (lambda m: m.generate("hi", stop=123), "stop must be"),
    "stop list of numbers": (lambda m: m.generate("hi", stop=[1]), "stop must be"),
    "empty stop string": (lambda m: m.generate("hi", stop=[""]), "stop must be"),
    "too many beams": (lambda m: m.generate("hi", num_beams=10**5), "num_beams must be an integer in [1, 64]"),
    "use_cache a string": (lambda m: m.generate("hi", use_cache="no"), "use_cache must be True or False"),
    "early_stopping outside beam search": (lambda m: m.generate("hi", early_stopping="maybe"), "early_stopping must be"),
    "hook not callable": (lambda m: m.run_with_hooks("hi", hooks={"blocks.0.attn.hook_z": 5}), "not callable"),
    "hook returns a number": (lambda m: m.run_with_hooks("hi", hooks={"blocks.0.attn.hook_z": lambda x, n: 3}),
                              "returned int"),
    "hooks None": (lambda m: m.run_with_hooks("hi", hooks=None), "hooks must map"),
    "names a number": (lambda m: m.run_with_cache("hi", names=123), "names must be"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_input_is_a_clear_error(tiny, name):
    call, message = BAD_CALLS[name]
    with pytest.raises(InvalidArgumentError) as info:
        call(tiny)
    assert message in str(info.value)


@pytest.mark.parametrize("call", [lambda m: m.logits(TOO_LONG), lambda m: m.run_with_cache(TOO_LONG, names="hook_embed"),
                                  lambda m: m.generate(TOO_LONG, max_new_tokens=1)])
def test_passes_longer_than_the_context_are_refused(tiny, call):
    with pytest.raises(ContextOverflowError, match="context length of 256"):
        call(tiny)


def test_good_ids_still_work(tiny):
    """The checks pass every valid form: a list, a (T,) tensor, a (B, T) int32 tensor, the last id."""
    last = VOCAB_SIZE - 1
    assert tiny.logits([0, last]).shape == (2, VOCAB_SIZE)
    assert tiny.logits(torch.tensor([[0, last]], dtype=torch.int32)).shape == (1, 2, VOCAB_SIZE)
    logits, cache = tiny.run_with_cache(torch.tensor([5, last]), names="hook_embed")
    assert logits.shape == (1, 2, VOCAB_SIZE) and cache["hook_embed"].shape[:2] == (1, 2)
    assert isinstance(tiny.generate((1, 2, 3), max_new_tokens=2), str)
