"""Beam and contrastive search (lucidlm.search) against outside references.

- Beam search: the sequences and `sequences_scores` of Hugging Face transformers'
  `generate(num_beams=..., do_sample=False, output_scores=True, return_dict_in_generate=True)`,
  on a tiny random Llama (HF model and ours hold equal weights) and on SmolLM2.
- Contrastive search: a brute-force reference written here from the definition, run on the
  HF model: every candidate is scored by its own full forward pass without a cache.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny_decoding_model import tiny_pair

from lucidlm.errors import InvalidArgumentError
from lucidlm.search import BeamParams, beam_search, contrastive_search_tokens

EOS = 5
PROMPT = [7, 20, 33, 41, 9]
MAX_NEW = 10


@pytest.fixture(scope="module", params=[1.5, 2.0], ids=["eos-sometimes", "eos-often"])
def tiny(request):
    """(hf, ours): the EOS row of lm_head scaled by 1.5 or 2, so that beams end at varied lengths."""
    return tiny_pair(seed=0, eos_id=EOS, boost=request.param)


def hf_beams(hf, prompt, max_new_tokens, num_beams, length_penalty, early_stopping, num_return, eos_ids):
    """HF's hypotheses as (generated ids up to and including the first EOS, score)."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          num_beams=num_beams, do_sample=False, num_return_sequences=num_return,
                          max_new_tokens=max_new_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                          output_scores=True, return_dict_in_generate=True, eos_token_id=eos_ids,
                          pad_token_id=eos_ids[0], min_new_tokens=0, repetition_penalty=1.0,
                          no_repeat_ngram_size=0)
    hypotheses = []
    for sequence, score in zip(out.sequences, out.sequences_scores):
        ids = sequence[len(prompt):].tolist()
        end = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids) - 1)
        hypotheses.append((ids[: end + 1], float(score)))
    return hypotheses


def assert_same_beams(ours, expected):
    assert [h.token_ids for h in ours] == [ids for ids, _ in expected]
    torch.testing.assert_close(torch.tensor([h.score for h in ours], dtype=torch.float64),
                               torch.tensor([s for _, s in expected], dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping", "num_return"), [
    (4, 1.0, False, 3), (4, 0.0, "never", 2), (3, 2.0, True, 3), (4, -1.0, False, 4), (2, 1.5, "never", 1),
])
def test_beam_search_matches_transformers_tiny(tiny, num_beams, length_penalty, early_stopping, num_return):
    hf, ours = tiny
    expected = hf_beams(hf, PROMPT, MAX_NEW, num_beams, length_penalty, early_stopping, num_return, [EOS])
    params = BeamParams(num_beams, length_penalty, early_stopping, num_return)
    assert_same_beams(beam_search(ours, PROMPT, MAX_NEW, params, stop_ids={EOS}), expected)


def test_beam_search_with_two_stop_ids_matches_transformers(tiny):
    # Two EOS ids widen the kept continuations to 3 * num_beams.
    hf, ours = tiny
    expected = hf_beams(hf, PROMPT, MAX_NEW, 3, 1.0, False, 3, [EOS, 27])
    assert_same_beams(beam_search(ours, PROMPT, MAX_NEW, BeamParams(3, 1.0, False, 3), stop_ids={EOS, 27}), expected)


def test_one_beam_is_greedy(tiny):
    hf, ours = tiny
    with torch.inference_mode():
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    (best,) = beam_search(ours, PROMPT, 6, BeamParams(1, 1.0, False, 1))
    assert best.token_ids == greedy


def test_beam_search_keeps_raw_logprobs(tiny):
    hf, ours = tiny
    (best,) = beam_search(ours, PROMPT, 5, BeamParams(3, 1.0, False, 1), stop_ids={EOS}, keep_steps=True)
    with torch.inference_mode():
        logits = hf(torch.tensor([PROMPT + best.token_ids])).logits[0, len(PROMPT) - 1: -1]  # (n, V)
    expected = torch.log_softmax(logits, dim=-1)
    assert [s.token_id for s in best.steps] == best.token_ids
    torch.testing.assert_close(torch.stack([s.logprobs for s in best.steps]), expected, atol=1e-4, rtol=0)
    # With length_penalty 1, the score is the mean log-prob of the chosen tokens.
    chosen = expected.gather(1, torch.tensor(best.token_ids)[:, None]).sum()
    assert best.score == pytest.approx(float(chosen) / len(best.token_ids), abs=1e-4)


def test_beam_search_max_time_ends_every_beam(tiny):
    _, ours = tiny
    hypotheses = beam_search(ours, PROMPT, MAX_NEW, BeamParams(3, 1.0, False, 3), max_time=1e-9)
    assert [len(h.token_ids) for h in hypotheses] == [1, 1, 1]  # the first step was the last


@pytest.mark.parametrize("kwargs", [dict(num_beams=0), dict(num_beams=2, num_return_sequences=3),
                                    dict(early_stopping="sometimes"), dict(length_penalty=float("nan"))])
def test_bad_beam_params(kwargs):
    with pytest.raises(InvalidArgumentError):
        BeamParams(**kwargs)


# ----- contrastive search -----

def brute_force_contrastive(hf, prompt, steps, penalty_alpha, top_k):
    """Su et al. 2022 from the definition: for each of the top_k tokens v, a full uncached
    forward pass over prompt + generated + [v] gives v's last hidden state (output of the
    final norm) and those of every earlier position; pick the best (1-a) p(v) - a max cos."""
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            probs = hf(torch.tensor([sequence])).logits[0, -1].softmax(-1)
            top_probs, candidates = probs.topk(top_k)
            scores = []
            for p, v in zip(top_probs.tolist(), candidates.tolist()):
                hidden = hf(torch.tensor([sequence + [v]]), output_hidden_states=True).hidden_states[-1][0]  # (S+1, C)
                similarity = F.cosine_similarity(hidden[-1:], hidden[:-1], dim=-1).max()
                scores.append((1 - penalty_alpha) * p - penalty_alpha * float(similarity))
            sequence.append(candidates.tolist()[max(range(top_k), key=lambda i: scores[i])])
    return sequence[len(prompt):]


@pytest.mark.parametrize(("penalty_alpha", "top_k"), [(0.6, 4), (0.3, 6), (1.0, 3)])
def test_contrastive_matches_brute_force_tiny(tiny, penalty_alpha, top_k):
    hf, ours = tiny
    expected = brute_force_contrastive(hf, PROMPT, 8, penalty_alpha, top_k)
    actual = [s.token_id for s in contrastive_search_tokens(ours, PROMPT, 8, penalty_alpha, top_k)]
    assert actual == expected


def test_contrastive_with_alpha_zero_is_greedy(tiny):
    hf, ours = tiny
    with torch.inference_mode():
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    assert [s.token_id for s in contrastive_search_tokens(ours, PROMPT, 6, 0.0, 5)] == greedy


@pytest.mark.parametrize(("alpha", "k"), [(-0.1, 4), (1.5, 4), (0.5, 0)])
def test_bad_contrastive_params(tiny, alpha, k):
    _, ours = tiny
    with pytest.raises(InvalidArgumentError):
        next(contrastive_search_tokens(ours, PROMPT, 4, alpha, k))


# ----- the real model -----

SMOL_PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]


@pytest.mark.slow
@pytest.mark.parametrize(("text", "length_penalty", "early_stopping"), [
    (SMOL_PROMPTS[0], 1.0, False), (SMOL_PROMPTS[1], 0.5, True), (SMOL_PROMPTS[0], 2.0, "never"),
])
def test_beam_search_matches_transformers_smollm(lucid_smollm, hf_smollm_model, hf_smollm_tokenizer,
                                                 text, length_penalty, early_stopping):
    stop_ids = sorted(lucid_smollm.stop_ids)
    ids = hf_smollm_tokenizer(text).input_ids
    expected = hf_beams(hf_smollm_model, ids, 8, 3, length_penalty, early_stopping, 2, stop_ids)
    actual = beam_search(lucid_smollm.model, ids, 8, BeamParams(3, length_penalty, early_stopping, 2),
                         stop_ids=stop_ids)
    assert [h.token_ids for h in actual] == [e for e, _ in expected]
    # Scores are means of log-probs; our logits agree with HF's to ~1e-4.
    torch.testing.assert_close(torch.tensor([h.score for h in actual]), torch.tensor([s for _, s in expected]),
                               atol=2e-4, rtol=0)


@pytest.mark.slow
def test_contrastive_matches_brute_force_smollm(lucid_smollm, hf_smollm_model, hf_smollm_tokenizer):
    ids = hf_smollm_tokenizer(SMOL_PROMPTS[0]).input_ids
    expected = brute_force_contrastive(hf_smollm_model, ids, 3, 0.6, 4)
    actual = [s.token_id for s in contrastive_search_tokens(lucid_smollm.model, ids, 3, 0.6, 4)]
    assert actual == expected
