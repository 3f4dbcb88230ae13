"""Turning a Hugging Face checkpoint directory into a ready model.

A directory holds `config.json` and the weights, either one `model.safetensors` or shards
listed in `model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}).
The family comes from config.json's `model_type` (or, failing that, `architectures`); its
entry in `hf_names.HF_FAMILIES` says which model class to build and how checkpoint keys map
to our parameter names.

As for GGUF files (`load.py`), the model is built on the `meta` device and we check, before
reading any tensor data, that the files hold exactly the tensors the config implies with the
right shapes. Only safetensors are read: a `.bin`/`.pt` checkpoint is a Python pickle, and
unpickling a file can run arbitrary code, so we refuse it and say how to convert it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelFileError, UnsupportedError
from ..progress import Progress
from ..tokenizers import load_tokenizer
from .hf_names import ARCHITECTURE_ALIASES, HF_FAMILIES, HFFamily

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names we convert to `dtype`


@dataclass
class LoadedHF:
    model: torch.nn.Module
    config: dict  # config.json as read
    family: str  # key of HF_FAMILIES
    path: Path


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{config_path}: expected a JSON object")
    return config


def family_of(config: dict, path: Path) -> str:
    """The HF_FAMILIES key for this config.json."""
    model_type = config.get("model_type")
    if model_type in HF_FAMILIES:
        return model_type
    for architecture in config.get("architectures") or ():
        if architecture in ARCHITECTURE_ALIASES:
            return ARCHITECTURE_ALIASES[architecture]
    described = f"model_type '{model_type}'" if model_type else f"architectures {config.get('architectures')}"
    raise UnsupportedError(f"{path}: {described} is not supported (supported: {', '.join(sorted(HF_FAMILIES))})")


def tensor_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    if (path / SINGLE_FILE).is_file():
        try:
            with safe_open(path / SINGLE_FILE, framework="pt") as f:
                return {name: path / SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{path / SINGLE_FILE}: not a readable safetensors file ({e})") from None
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ModelFileError(f"{path / INDEX_FILE}: not a safetensors index (no 'weight_map')") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        absent = sorted({p.name for p in files.values() if not p.is_file()})
        if absent:
            raise ModelFileError(f"{path}: shard {absent[0]} listed in {INDEX_FILE} is missing"
                                 + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsupportedError(
            f"{path}: weights only as {pickles[0]}, a pickle file, which LucidLM does not open because "
            "unpickling can run arbitrary code; convert it to safetensors (e.g. transformers' "
            "save_pretrained(..., safe_serialization=True)) and load that")
    raise ModelFileError(f"{path}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def _shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype), read from the file headers only."""
    out = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if files.get(name) == file:
                        info = f.get_slice(name)
                        out[name] = (tuple(info.get_shape()), info.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{file}: not a readable safetensors file ({e})") from None
    missing = [name for name in files if name not in out]
    if missing:
        raise ModelFileError(f"{files[missing[0]]}: does not contain tensor '{missing[0]}' listed in {INDEX_FILE}")
    return out


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def check_tensors(path: Path, family: HFFamily, names: dict[str, str], shapes: dict, expected: dict) -> None:
    """Every expected tensor present once, nothing unexpected, every shape and dtype right."""
    ours = set(names.values())
    missing = [n for n in expected if n not in ours]
    if missing:
        raise ModelFileError(f"{path}: checkpoint lacks tensors {_few([family.prefix + n for n in missing])}")
    unexpected = [key for key, n in names.items() if n not in expected]
    if unexpected:
        raise ModelFileError(f"{path}: checkpoint has tensors this config does not use: {_few(unexpected)}")
    for key, name in names.items():
        shape, dtype = shapes[key]
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"{path}: tensor '{key}' has dtype {dtype} (supported: {', '.join(FLOAT_DTYPES)})")
        want = expected[name][::-1] if family.is_transposed(name) else expected[name]
        if shape != want:
            raise ModelFileError(f"{path}: tensor '{key}' has shape {shape}, expected {want}")


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedHF:
    """Read a checkpoint directory into its family's model, weights converted to `dtype`."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"{path}: not a directory")
    config = read_config(path)
    family_name = family_of(config, path)
    family = HF_FAMILIES[family_name]
    try:
        cfg = family.make_config(config)
    except (ValueError, TypeError) as e:  # sizes that are not numbers, heads that do not divide ...
        raise ModelFileError(f"{path / 'config.json'}: {e}") from None
    files = tensor_files(path)

    with torch.device("meta"):
        model = family.model_class(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied_to = None
    if cfg.tie_embeddings:
        # The head is the embedding table: not a tensor of its own (some files save a copy; unused).
        expected.pop("lm_head.weight")
        tied_to = next(n for n, p in model.named_parameters() if p is model.lm_head.weight)
    names = {key: family.our_name(key) for key in files}
    names = {key: ours for key, ours in names.items()
             if ours is not None and not (cfg.tie_embeddings and ours == "lm_head.weight")}
    check_tensors(path, family, names, _shapes({k: files[k] for k in names}), expected)

    state = {}
    bar = Progress(f"Loading {path.name}", len(names), enabled=progress)
    by_file: dict[Path, list[str]] = {}
    for key in names:
        by_file.setdefault(files[key], []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                tensor = f.get_tensor(key)
                ours = names[key]
                if family.is_transposed(ours):
                    tensor = tensor.t()
                state[ours] = tensor.to(dtype).contiguous()
                bar.update(len(state))
    bar.close()
    if tied_to is not None:
        state["lm_head.weight"] = state[tied_to]
    model.load_state_dict(state, strict=True, assign=True)
    if tied_to is not None:
        model.lm_head.weight = model.get_parameter(tied_to)
    model.eval()
    return LoadedHF(model, config, family_name, path)


def load_tokenizer_for_directory(path: Path, vocab_size: int):
    """The tokenizer of a Hugging Face directory (its tokenizer.json), read by `lucidlm.tokenizers`.

    Checkpoints often pad the embedding table beyond the tokenizer's vocabulary (Phi-3: 32064
    rows for 32011 tokens), so the tokenizer may be smaller than the model, never larger.
    """
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ModelFileError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary size is {vocab_size}")
    return tokenizer
