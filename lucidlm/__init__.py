"""LucidLM: a readable, inspectable transformer language-model engine on PyTorch.

    import lucidlm
    m = lucidlm.load()
    print(m.generate("The capital of France is", max_new_tokens=10))

See `lucidlm.models.layers` for the glossary of dimension letters used in shape comments.
"""

from .api import LucidModel, load
from .errors import LucidError

__version__ = "0.1.0"
__all__ = ["load", "LucidModel", "LucidError", "__version__"]
