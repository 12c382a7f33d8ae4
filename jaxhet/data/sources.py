"""Where documents come from: the standard library's sources, a directory, a text file or a JSONL file.

A source lists its documents up front (paths, or byte offsets of JSONL lines) and reads one document at a time,
so memory stays bounded by the largest document rather than the corpus.
"""

from __future__ import annotations

import json
import os
import sysconfig
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from jaxhet.data.config import STDLIB_SOURCE
from jaxhet.models.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIX = ".jsonl"
JSONL_TEXT_KEY = "text"
# Directories of the standard library that hold installed packages, test suites or bytecode, not library source.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DocumentSource(Protocol):
    """A fixed, ordered collection of documents read on demand."""

    description: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> str: ...


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _walk(root: Path, suffixes: Iterable[str], excluded_dirs: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `root` with one of `suffixes`, skipping directories named in `excluded_dirs`, sorted by path."""
    suffixes = tuple(suffixes)
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded_dirs]
        found.extend(Path(directory, name) for name in files if name.endswith(suffixes))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    root = Path(sysconfig.get_path("stdlib"))
    return root if (root / "os.py").is_file() else Path(os.__file__).parent


def stdlib_corpus_files() -> list[Path]:
    """The standard library's own .py files, without installed packages and test suites: a real corpus of
    several megabytes present on every machine with Python."""
    return _walk(stdlib_root(), (".py",), STDLIB_EXCLUDED_DIRS)


class FileDocuments:
    """One document per file."""

    def __init__(self, paths: Sequence[Path], description: str):
        if not paths:
            raise ValueError(f"no documents in {description}: expected *{', *'.join(TEXT_SUFFIXES)} files")
        self.paths = list(paths)
        self.description = description

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> str:
        return _read_text(self.paths[index])


class JsonlDocuments:
    """One document per non-blank line of a JSONL file, its text under the key "text"."""

    def __init__(self, path: Path):
        self.path = path
        self.description = str(path)
        self._offsets = array("q")
        self._line_numbers = array("q")
        offset = 0
        with path.open("rb") as file:
            for line_number, line in enumerate(file, start=1):
                if line.strip():
                    self._offsets.append(offset)
                    self._line_numbers.append(line_number)
                offset += len(line)
        if not self._offsets:
            raise ValueError(f"no documents in {path}: the JSONL file has no non-blank lines")

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, index: int) -> str:
        with self.path.open("rb") as file:
            file.seek(self._offsets[index])
            line = file.readline().decode("utf-8", errors="replace")
        where = f"{self.path}:{self._line_numbers[index]}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        text = record.get(JSONL_TEXT_KEY) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected an object with a string under the key {JSONL_TEXT_KEY!r}")
        return text


def open_source(source: str) -> DocumentSource:
    """The documents named by `DataConfig.source`."""
    if source == STDLIB_SOURCE:
        return FileDocuments(stdlib_corpus_files(), f"the standard library at {stdlib_root()}")
    path = Path(source).expanduser()
    if path.is_dir():
        return FileDocuments(_walk(path, TEXT_SUFFIXES), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"source {source!r} does not exist; expected {STDLIB_SOURCE!r} or an existing path")
    if path.suffix == JSONL_SUFFIX:
        return JsonlDocuments(path)
    if path.suffix in TEXT_SUFFIXES:
        return FileDocuments([path], str(path))
    raise ConfigError(
        f"source {source!r} has an unsupported suffix; expected a directory or a file ending in "
        f"{', '.join((*TEXT_SUFFIXES, JSONL_SUFFIX))}"
    )
