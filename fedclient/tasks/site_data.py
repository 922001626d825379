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
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    completions: bool = False  # texts are prompts and classes the completions ({prompt, completion} rows)

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


def _read_examples(directory: pathlib.Path, files: Sequence[pathlib.Path], fields: tuple[str, str],
                   label_problem: Callable[[str], str | None], bad_target: str,
                   ) -> tuple[list[str], list[str], list[str], dict[str, int]]:
    """Rows of ``files`` as (input, target, split) lists, both ``fields`` stripped non-empty strings
    and ``split`` one of :data:`SPLITS`; every bad row (and a file with none) becomes a problem, and
    any problem raises :class:`SiteDataError` for the whole directory."""
    input_field, target_field = fields
    inputs: list[str] = []
    targets: list[str] = []
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
                source, target, split = row.get(input_field), row.get(target_field), row.get("split") or ""
                if not isinstance(source, str) or not source.strip():
                    problems.append(f"{where}: empty or missing {input_field}")
                elif not isinstance(target, str) or not target.strip():
                    problems.append(f"{where}: " + bad_target.format(value=target))
                elif (problem := label_problem(target.strip())) is not None:
                    problems.append(f"{where}: {problem}")
                elif split not in SPLITS:
                    problems.append(f"{where}: split {split!r} must be 'train', 'eval' or empty")
                else:
                    inputs.append(source.strip())
                    targets.append(target.strip())
                    splits.append(str(split))
                    count += 1
        except UnicodeDecodeError as err:
            problems.append(f"{path.name}: not UTF-8 text (byte {err.start}); re-export it as UTF-8")
        per_file[path.name] = count
        if count == 0 and not any(p.startswith(path.name) for p in problems):
            problems.append(f"{path.name}: no rows")
    if problems:
        raise SiteDataError(f"{len(problems)} problem(s) in {directory}:\n  " + "\n  ".join(_summarised(problems)))
    return inputs, targets, splits, per_file


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

    def label_problem(label: str) -> str | None:
        if check_labels and label not in index:
            return f"label {label!r} is not one of the task's classes {list(index)}"
        return None

    texts, names, splits, per_file = _read_examples(directory, files, ("text", "label"), label_problem,
                                                       "label {value!r} is not a class name")
    if not check_labels:
        index = {name: i for i, name in enumerate(sorted(set(names)))}
    labels = [index[name] for name in names]
    return SiteCorpus(directory, tuple(texts), np.asarray(labels, dtype=np.int64), tuple(splits),
                      tuple(classes) if check_labels else tuple(index), per_file)


def read_prompt_completions(directory: str | pathlib.Path) -> SiteCorpus:
    """Prompt → completion examples from ``directory``'s ``*.jsonl`` files (one object per line
    with string fields ``prompt`` and ``completion``, optional ``split``), for a causal LM. The
    distinct completions become the corpus's classes (a row's label is its completion's index), so
    label-skew partitions and exact match work as for class names. Raises :class:`SiteDataError`
    naming each bad file and line."""
    directory = pathlib.Path(directory).expanduser()
    files = sorted(p for p in directory.glob("*.jsonl") if p.is_file()) if directory.is_dir() else []
    if not files:
        raise SiteDataError(f"no *.jsonl file in {directory}; put prompt/completion pairs there as JSON Lines: "
                            '{"prompt": "...", "completion": "..."}')
    texts, answers, splits, per_file = _read_examples(directory, files, ("prompt", "completion"), lambda _: None,
                                                          "empty or missing completion")
    classes = tuple(sorted(set(answers)))
    index = {answer: i for i, answer in enumerate(classes)}
    return SiteCorpus(directory, tuple(texts), np.asarray([index[a] for a in answers], dtype=np.int64),
                      tuple(splits), classes, per_file, completions=True)


def holds_prompt_completions(directory: str | pathlib.Path) -> bool:
    """Whether ``directory`` holds ``{prompt, completion}`` JSON Lines rather than labelled text:
    no CSV file, and the first record of its first ``*.jsonl`` file has a ``prompt`` field."""
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir() or any(directory.glob("*.csv")):
        return False
    for path in sorted(directory.glob("*.jsonl")):
        for _, row in _rows(path):
            return isinstance(row, dict) and "prompt" in row
    return False


def read_site_examples(directory: str | pathlib.Path, classes: Sequence[str] | None) -> SiteCorpus:
    """A directory of either format: ``{prompt, completion}`` JSON Lines
    (:func:`read_prompt_completions`) or labelled text (:func:`read_site_corpus` with ``classes``)."""
    if holds_prompt_completions(directory):
        return read_prompt_completions(directory)
    return read_site_corpus(directory, classes)
