"""BERT encoder on the real all-MiniLM-L6-v2 weights vs transformers' BertModel + mean pooling
(the sentence-transformers recipe: mean over real tokens, then L2 normalisation)."""

import pytest
import torch

from lucidlm.errors import InvalidArgumentError, LucidError

SENTENCES = [
    "The cat sat on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply today after the announcement.",
    "Café au lait, naïve résumé — ÉCOLE!",
    "東京は日本の首都です。",
    "def add(a, b):\n    return a + b",
    "🙂 emoji 👨‍👩‍👧 and numbers 1234567",
]


@pytest.fixture(scope="module")
def minilm():
    import lucidlm

    return lucidlm.load("minilm-l6-v2", progress=False)


@pytest.fixture(scope="module")
def reference_embeddings(minilm):
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm.path)
    model = BertModel.from_pretrained(minilm.path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state  # (N, T, C)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_embeddings_match_reference(minilm, reference_embeddings):
    ours = minilm.embed(SENTENCES)
    assert ours.shape == reference_embeddings.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(ours, reference_embeddings, atol=1e-5, rtol=0)


def test_batched_equals_one_by_one(minilm):
    batched = minilm.embed(SENTENCES)
    alone = torch.cat([minilm.embed(s) for s in SENTENCES])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
    e = minilm.embed(SENTENCES[:3])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_encoder_rejects_generation_and_bad_input(minilm):
    with pytest.raises(LucidError, match="encoder"):
        minilm.generate("hello")
    with pytest.raises(InvalidArgumentError):
        minilm.embed([])
    with pytest.raises(InvalidArgumentError):
        minilm.embed(["fine", ""])
