"""A partner site's own labelled text, read from a directory on the site's disk.

The format (documented in the README, "A site's own data"):

- a directory holding one or more ``*.csv`` and/or ``*.jsonl`` files (UTF-8; other files are
  ignored, subdirectories are not read);
- **CSV**: a header row naming at least the columns ``text`` and ``label`` (any others are
  ignored); standard quoting, so texts may hold commas and newlines;
- **JSON Lines**: one object per line with string fields ``text`` and ``label``; blank lines skipped;
- ``label`` is a class *name* of the task the federation trains (``fedclient check-data DIR --task T``
  lists them; e.g. ``business``/``entertainment``/``politics``/``sport``/``tech`` for ``minilm-bbc``):
  every site must map names to the same output unit, so ids are never read from the files;
- an optional ``split`` column/field, ``train`` or ``eval``, fixes which rows the site uses for its
  local evaluation; rows without it are split 90/10 by a seeded shuffle.

Every problem found is reported at once with its file and line, so a site fixes its export in one go.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

FORMATS = ("*.csv", "*.jsonl")
SPLITS = ("train", "eval", "")
MAX_PROBLEMS_PER_FILE = 5


class SiteDataError(ValueError):
    """The site's data directory cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class SiteCorpus:
    """A site's labelled documents: label ids follow the task's class order."""

    directory: pathlib.Path
    texts: tuple[str, ...]
    labels: np.ndarray
    splits: tuple[str, ...]
    classes: tuple[str, ...]
    rows_per_file: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels.tolist())
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}

    def split_rows(self, seed: int, eval_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """Row indices for training and for local evaluation: the ``split`` field where given,
        else a seeded ``eval_fraction`` of the unmarked rows (none when there are fewer than 10)."""
        marked = np.asarray(self.splits)
        train = np.flatnonzero(marked == "train")
        evaluate = np.flatnonzero(marked == "eval")
        free = np.random.default_rng(seed).permutation(np.flatnonzero(marked == ""))
        n_eval = int(len(free) * eval_fraction) if len(free) >= 10 else 0
        return np.sort(np.concatenate([train, free[n_eval:]])), np.sort(np.concatenate([evaluate, free[:n_eval]]))


def _rows(path: pathlib.Path) -> Iterator[tuple[int, dict[str, object] | str]]:
    """(line number, row) for each record of ``path``; a string row is a parse error."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            yield from _csv_rows(handle)
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, f"not JSON ({err.msg})"
                continue
            yield number, row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"


def _csv_rows(handle: Iterable[str]) -> Iterator[tuple[int, dict[str, object] | str]]:
    """(line, row) for each CSV record, numbered by the line the record *starts* on (a quoted text
    may run over several lines); a quote never closed is reported where it opened."""
    started = {"line": 0, "first": None}

    def lines() -> Iterator[str]:
        for number, line in enumerate(handle, start=1):
            if started["first"] is None:
                started["first"] = number
            started["line"] = number
            yield line

    reader = csv.reader(lines(), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as err:
        yield 1, f"the header cannot be read ({err})"
        return
    missing = [c for c in ("text", "label") if c not in header]
    if missing:
        yield 1, f"header lacks column(s) {missing} (found {header or 'no header'})"
        return
    while True:
        started["first"] = None
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            where = started["first"] or started["line"]
            if "unexpected end of data" in str(err):
                yield where, "a quote opened in this record is never closed (the rest of the file was read as one field)"
            else:
                yield where, f"not valid CSV ({err}); quote texts that hold commas, quotes or newlines"
            return
        where = started["first"] or started["line"]
        if not fields:
            continue  # a blank line
        if len(fields) != len(header):
            yield where, f"{len(fields)} fields, the header has {len(header)}"
            continue
        yield where, dict(zip(header, fields, strict=True))


def _summarised(problems: list[str]) -> list[str]:
    """At most ``MAX_PROBLEMS_PER_FILE`` lines per file, then a count, so every bad file shows."""
    by_file: dict[str, list[str]] = {}
    for problem in problems:
        by_file.setdefault(problem.split(":", 1)[0], []).append(problem)
    lines: list[str] = []
    for name, found in by_file.items():
        lines += found[:MAX_PROBLEMS_PER_FILE]
        if len(found) > MAX_PROBLEMS_PER_FILE:
            lines.append(f"{name}: ... and {len(found) - MAX_PROBLEMS_PER_FILE} more")
    return lines


def read_site_corpus(directory: str | pathlib.Path, classes: Sequence[str] | None) -> SiteCorpus:
    """Read and validate every data file in ``directory``; label names map to ``classes``' order.
    With ``classes=None`` only the format is checked and labels are numbered in sorted order.

    Raises :class:`SiteDataError` naming each bad file/line (at most 5 per file, then a count), a missing or
    empty directory, a class-less result, or labels outside ``classes``.
    """
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir():
        raise SiteDataError(f"data directory {directory} does not exist or is not a directory")
    files = sorted({p for pattern in FORMATS for p in directory.glob(pattern) if p.is_file()})
    if not files:
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise SiteDataError(
            f"no *.csv or *.jsonl file in {directory} (found: {', '.join(present) or 'nothing'}); "
            "put the site's labelled text there as CSV with columns text,label or JSON Lines"
        )
    check_labels = classes is not None
    index: dict[str, int] = {name: i for i, name in enumerate(classes or ())}
    texts: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    per_file: dict[str, int] = {}
    problems: list[str] = []
    for path in files:
        count = 0
        try:
            for line, row in _rows(path):
                where = f"{path.name}:{line}"
                if isinstance(row, str):
                    problems.append(f"{where}: {row}")
                    continue
                text, label, split = row.get("text"), row.get("label"), row.get("split") or ""
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{where}: empty or missing text")
                elif not isinstance(label, str) or not label.strip():
                    problems.append(f"{where}: label {label!r} is not a class name")
                elif check_labels and label.strip() not in index:
                    problems.append(f"{where}: label {label!r} is not one of the task's classes {list(index)}")
                elif split not in SPLITS:
                    problems.append(f"{where}: split {split!r} must be 'train', 'eval' or empty")
                else:
                    texts.append(text.strip())
                    labels.append(index.setdefault(label.strip(), len(index)))
                    splits.append(str(split))
                    count += 1
        except UnicodeDecodeError as err:
            problems.append(f"{path.name}: not UTF-8 text (byte {err.start}); re-export it as UTF-8")
        per_file[path.name] = count
        if count == 0 and not any(p.startswith(path.name) for p in problems):
            problems.append(f"{path.name}: no rows")
    if problems:
        raise SiteDataError(f"{len(problems)} problem(s) in {directory}:\n  " + "\n  ".join(_summarised(problems)))
    return SiteCorpus(directory, tuple(texts), np.asarray(labels, dtype=np.int64), tuple(splits),
                      tuple(classes) if check_labels else tuple(index), per_file)
