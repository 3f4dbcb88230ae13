"""The catalogue: model names that name nothing (empty, not a string) are refused; models split
over several packages are joined into one cache file (`catalogue._assembled`).

The packages' own `assemble` is replaced here by a stand-in module with the same functions
(`chunk_paths`, `default_output_path`, `assemble`): what is tested is how LucidLM calls it.
Oracle: the bytes of the chunks, and the file a process had mapped before a re-assembly.
"""

from __future__ import annotations

import mmap
import sys
import types
from pathlib import Path

import pytest

import lucidlm
from lucidlm.errors import InvalidArgumentError, ModelFileError
from lucidlm.loading.catalogue import DEFAULT_MODEL, _assembled, resolve


def _parts_module(tmp_path: Path, chunks: list[bytes], corrupt: bool = False) -> types.ModuleType:
    directory = tmp_path / "chunks"
    directory.mkdir(exist_ok=True)
    paths = []
    for i, data in enumerate(chunks):
        paths.append(directory / f"part{i}")
        paths[-1].write_bytes(data)
    module = types.ModuleType("fake_model_parts")
    module.calls = []

    def assemble(output_path=None, overwrite=False):
        module.calls.append(Path(output_path))
        with open(output_path, "wb") as out:
            for path in paths:
                out.write(path.read_bytes())
        if corrupt:  # as the real one does when the result's sha256 differs
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)

    module.chunk_paths = lambda: paths
    module.default_output_path = lambda: tmp_path / "cache" / "model.gguf"
    module.assemble = assemble
    (tmp_path / "cache").mkdir(exist_ok=True)
    return module


def test_assembles_once_then_reuses(tmp_path, monkeypatch):
    module = _parts_module(tmp_path, [b"GGUF", b"abc" * 1000, b"end"])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    target = _assembled(module.__name__)
    assert target == module.default_output_path()
    assert target.read_bytes() == b"GGUF" + b"abc" * 1000 + b"end"
    assert _assembled(module.__name__) == target and len(module.calls) == 1  # reused: same size
    assert list(target.parent.iterdir()) == [target]  # no partial file left behind


def test_reassembly_leaves_a_mapped_file_intact(tmp_path, monkeypatch):
    """A stale cache file (wrong size) is replaced by renaming, not rewritten in place: a process
    that has it memory-mapped (a loaded model's embedding table) still reads the old bytes."""
    module = _parts_module(tmp_path, [b"new-" * 5000])
    monkeypatch.setitem(sys.modules, module.__name__, module)
    target = module.default_output_path()
    old = b"old!" * 3000
    target.write_bytes(old)
    with open(target, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        assert _assembled(module.__name__) == target
        assert target.read_bytes() == b"new-" * 5000
        assert mapped[:] == old  # rewriting in place would have truncated it under the mapping
        assert module.calls[0] != target
    finally:
        mapped.close()


def test_failed_assembly_is_a_clear_error(tmp_path, monkeypatch):
    module = _parts_module(tmp_path, [b"GGUF", b"x" * 100], corrupt=True)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(ModelFileError) as info:
        _assembled(module.__name__)
    assert "sha256" in str(info.value) and module.__name__ in str(info.value)
    assert list(module.default_output_path().parent.iterdir()) == []  # neither target nor partial


# ----- model names that are not names -----

@pytest.mark.parametrize("name", ["", "   "])
def test_empty_model_name_is_an_error_not_the_default_model(name):
    with pytest.raises(InvalidArgumentError, match="empty"):
        resolve(name)
    with pytest.raises(InvalidArgumentError, match="empty"):
        lucidlm.load(name, progress=False)


@pytest.mark.parametrize("name", [123, b"smollm2-135m-instruct", ["smollm2-135m-instruct"]])
def test_model_name_of_the_wrong_type(name):
    with pytest.raises(InvalidArgumentError) as info:
        lucidlm.load(name, progress=False)
    assert type(name).__name__ in str(info.value) and "\n" not in str(info.value)


def test_path_objects_are_accepted(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert resolve(None) == resolve(DEFAULT_MODEL)
