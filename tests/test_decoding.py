"""`LucidModel.generate_detailed` / `lucidlm.decoding` and the CLI's decoding flags.

Log-probabilities are checked against Hugging Face transformers: a tiny random Llama is
built there, written to GGUF and loaded by `lucidlm.load` (so it has a tokenizer), and the
reference log-softmax of HF's logits on the generated sequence must equal what we report,
with the same top-k alternatives. Bad input must raise InvalidArgumentError with one line.
"""

import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_cli import PROMPT, assert_user_error, lucid
from test_loading_gguf import hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

import lucidlm
from lucidlm.decoding import DecodingOptions
from lucidlm.errors import InvalidArgumentError

TEXT = "hello world, the capital of"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_model, LucidModel, gguf path): equal weights, untied output."""
    hf, tensors = hf_llama_and_gguf_tensors(tie=False, encoding=Q.F32, seed=3)
    path = write_gguf(tmp_path_factory.mktemp("decoding") / "tiny.gguf", tiny_metadata(), tensors)
    return hf, lucidlm.load(str(path), progress=False, dtype="float32"), path


def reference_logprobs(hf, prompt_ids, new_ids):
    """HF's log-softmax at each generated position: (len(new_ids), V)."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt_ids + new_ids])).logits[0, len(prompt_ids) - 1: -1]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_logprobs_match(completion, expected, k):
    assert len(completion.tokens) == len(completion.token_ids) == expected.shape[0] > 0
    for token, row in zip(completion.tokens, expected):
        assert token.logprob == pytest.approx(float(row[token.id]), abs=1e-4)
        top_values, top_ids = row.topk(k)
        assert [t.id for t in token.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([t.logprob for t in token.top]), top_values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.9, seed=4, n=2), dict(num_beams=3),
                                    dict(penalty_alpha=0.5, top_k=3)],
                         ids=["greedy", "sample-n2", "beam", "contrastive"])
def test_logprobs_match_transformers(tiny, kwargs):
    hf, model, _ = tiny
    prompt_ids = model.tokenizer.encode(TEXT)
    generation = model.generate_detailed(prompt_ids, max_new_tokens=6, logprobs=3, **kwargs)
    for completion in generation.completions:
        assert_logprobs_match(completion, reference_logprobs(hf, prompt_ids, completion.token_ids), 3)


def test_greedy_top1_is_the_chosen_token(tiny):
    _, model, _ = tiny
    generation = model.generate_detailed(TEXT, max_new_tokens=5, logprobs=1)
    assert [t.top[0].id for t in generation.completions[0].tokens] == generation.completions[0].token_ids


def test_generate_returns_the_best_beam_and_stream_equals_generate(tiny):
    _, model, _ = tiny
    detailed = model.generate_detailed(TEXT, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert detailed.strategy == "beam" and len(detailed.completions) == 2
    assert detailed.completions[0].score >= detailed.completions[1].score
    assert model.generate(TEXT, max_new_tokens=6, num_beams=3) == detailed.text
    contrastive = dict(max_new_tokens=6, penalty_alpha=0.6, top_k=4)
    assert "".join(model.stream(TEXT, **contrastive)) == model.generate(TEXT, **contrastive)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, temperature=0.7), "temperature"),
    (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha"),
    (dict(penalty_alpha=-0.1, top_k=4), "penalty_alpha"),
    (dict(n=0), "n must be"),
    (dict(n=2, num_beams=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(penalty_alpha=0.5), "top_k"),
    (dict(strategy="sample"), "temperature > 0"),
    (dict(strategy="nucleus"), "strategy"),
    (dict(logprobs=-1), "logprobs"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(max_time=0), "max_time"),
    (dict(beams=2), "unknown generation option"),
])
def test_bad_options_raise_one_line_errors(tiny, kwargs, fragment):
    _, model, _ = tiny
    with pytest.raises(InvalidArgumentError) as info:
        model.generate_detailed(TEXT, max_new_tokens=4, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError):
        DecodingOptions.from_kwargs(**kwargs)


def test_generate_refuses_to_drop_completions(tiny):
    _, model, _ = tiny
    with pytest.raises(InvalidArgumentError, match="generate_detailed"):
        model.generate(TEXT, max_new_tokens=3, temperature=1.0, n=2)


def test_n_samples_are_reproducible_with_a_seed(tiny):
    _, model, _ = tiny
    runs = [model.generate_detailed(TEXT, max_new_tokens=5, temperature=1.0, n=3, seed=7) for _ in range(2)]
    assert [c.token_ids for c in runs[0].completions] == [c.token_ids for c in runs[1].completions]
    assert len({tuple(c.token_ids) for c in runs[0].completions}) > 1


# ----- CLI -----

def test_cli_beam_json(tiny):
    _, _, path = tiny
    result, _ = lucid("generate", TEXT, "--model", str(path), "--strategy", "beam", "--num-return-sequences", "2",
                      "--max-new-tokens", "5", "--logprobs", "2", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["strategy"] == "beam" and len(data["completions"]) == 2
    first = data["completions"][0]
    assert len(first["tokens"]) == len(first["token_ids"]) and len(first["tokens"][0]["top"]) == 2
    assert first["score"] >= data["completions"][1]["score"]


def test_cli_compare_decoding(tiny):
    _, _, path = tiny
    result, _ = lucid("compare-decoding", TEXT, "--model", str(path), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    labels = [line.split(" | ")[0].strip() for line in result.stdout.splitlines()[1:] if not line.startswith(" ")]
    assert [label.split(" (")[0] for label in labels] == ["greedy", "beam", "contrastive", "sample 1", "sample 2",
                                                          "sample 3"]


@pytest.mark.parametrize(("args", "name"), [
    (["--num-beams", "0"], "num_beams"), (["--penalty-alpha", "1.5"], "penalty_alpha"), (["--n", "0"], "n must"),
    (["--strategy", "beam", "--temperature", "0.7"], "temperature"), (["--logit-bias", "x"], "--logit-bias"),
])
def test_cli_bad_decoding_flags_fail_before_loading(tmp_path, args, name):
    result, _ = lucid("generate", PROMPT, "--model", str(tmp_path / "missing.gguf"), *args)
    assert "missing.gguf" not in assert_user_error(result, name)


# ----- the real model -----

@pytest.mark.slow
def test_logprobs_match_transformers_smollm(lucid_smollm, hf_smollm_model, hf_smollm_tokenizer):
    prompt_ids = hf_smollm_tokenizer("The capital of France is").input_ids
    generation = lucid_smollm.generate_detailed(prompt_ids, max_new_tokens=5, logprobs=5)
    completion = generation.completions[0]
    assert_logprobs_match(completion, reference_logprobs(hf_smollm_model, prompt_ids, completion.token_ids), 5)
    assert completion.tokens[0].token == " Paris"
