"""A site's own labelled text (`--data DIR`): the documented CSV/JSONL format, every problem
reported with its file and line, and the task training on what was read."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from fedclient.tasks import SiteDataError, get_task, read_site_corpus

CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _write_site(directory: pathlib.Path, rows_per_class: int = 4) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "export.csv").open("w", encoding="utf-8", newline="") as handle:
        handle.write("id,text,label\n")
        for i in range(rows_per_class):
            handle.write(f'{i},"Shares rose, then fell\nagain ({i})",business\n')
            handle.write(f"{i},The match ended in a draw {i},sports\n")
    with (directory / "more.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(rows_per_class):
            handle.write(json.dumps({"text": f"New chip doubles speed {i}", "label": "tech"}) + "\n\n")
        handle.write(json.dumps({"text": "Parliament votes today", "label": "politics", "split": "eval"}) + "\n")


def test_csv_and_jsonl_rows_are_read_with_the_task_class_order(tmp_path: pathlib.Path) -> None:
    _write_site(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    corpus = read_site_corpus(tmp_path, CLASSES)
    assert len(corpus) == 13
    assert corpus.rows_per_file == {"export.csv": 8, "more.jsonl": 5}
    assert corpus.class_counts() == {"business": 4, "entertainment": 0, "politics": 1, "sports": 4, "tech": 4}
    assert corpus.texts[0] == "Shares rose, then fell\nagain (0)"  # quoted commas and newlines survive
    train, evaluate = corpus.split_rows(seed=1)
    assert corpus.splits[evaluate[-1]] == "eval" and len(evaluate) == 2  # the marked row + 10% of 12
    assert sorted(np.concatenate([train, evaluate]).tolist()) == list(range(13))
    assert np.array_equal(corpus.split_rows(seed=1)[0], train)  # seeded


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.csv", "body,label\nhello,sports\n", r"a.csv:1: header lacks column\(s\) \['text'\]"),
        ("a.csv", "text,label\nhello,cooking\n", r"a.csv:2: label 'cooking' is not one of the task's classes"),
        ("a.csv", "text,label\n   ,sports\n", r"a.csv:2: empty or missing text"),
        ("a.csv", "text,label\nhello,sports,extra\n", r"a.csv:2: 3 fields, the header has 2"),
        ("a.csv", "text,label\n", r"a.csv: no rows"),
        ("a.jsonl", '{"text": "x", "label": "sports"}\n{"text": "y",\n', r"a.jsonl:2: not JSON"),
        ("a.jsonl", '["x", "sport"]\n', r"a.jsonl:1: a JSON list, not an object"),
        ("a.jsonl", '{"text": "x", "label": 3}\n', r"a.jsonl:1: label 3 is not a class name"),
        ("a.jsonl", '{"text": "x", "label": "sports", "split": "test"}\n', r"split 'test' must be"),
    ],
)
def test_each_problem_names_its_file_and_line(tmp_path: pathlib.Path, name: str, content: str, expected: str) -> None:
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(SiteDataError, match=expected):
        read_site_corpus(tmp_path, CLASSES)


def test_all_problems_are_reported_at_once_and_encoding_is_checked(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.csv").write_text("text,label\n" + "x,nope\n" * 30, encoding="utf-8")
    (tmp_path / "b.csv").write_bytes(b"text,label\n\xff\xfe bad,sports\n")
    with pytest.raises(SiteDataError) as err:
        read_site_corpus(tmp_path, CLASSES)
    message = str(err.value)
    assert message.startswith("31 problem(s)") and "a.csv: ... and 25 more" in message
    assert "b.csv: not UTF-8 text" in message


def test_missing_and_empty_directories_say_what_to_do(tmp_path: pathlib.Path) -> None:
    with pytest.raises(SiteDataError, match="does not exist"):
        read_site_corpus(tmp_path / "nowhere", CLASSES)
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(SiteDataError, match=r"no \*.csv or \*.jsonl file .*found: readme.md"):
        read_site_corpus(tmp_path, CLASSES)


def test_a_task_tokenizes_site_data_and_refuses_an_all_eval_directory(tmp_path: pathlib.Path) -> None:
    task = get_task("tiny")
    _write_site(tmp_path / "site", rows_per_class=5)
    data = task.site_client_data(tmp_path / "site", seed=3)
    assert data.train.num_examples + data.evaluate.num_examples == 16
    assert data.train.input_ids.shape[1] == task.max_length
    assert set(data.train.labels.tolist()) <= {0, 2, 3, 4}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.jsonl").write_text(json.dumps({"text": "x", "label": "tech", "split": "eval"}))
    with pytest.raises(SiteDataError, match="nothing is left to train on"):
        task.site_client_data(tmp_path / "eval", seed=3)


def test_without_classes_only_the_format_is_checked(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "zebra"}\n{"text": "y", "label": "ant"}\n'
                                      '{"text": "z", "label": ""}\n')
    with pytest.raises(SiteDataError, match=r"a.jsonl:3: label '' is not a class name"):
        read_site_corpus(tmp_path, None)
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": "zebra"}\n{"text": "y", "label": "ant"}\n')
    assert read_site_corpus(tmp_path, None).classes == ("ant", "zebra")  # sorted, as documented


def test_prompt_completion_lines_become_examples_and_each_bad_line_is_named(tmp_path: pathlib.Path) -> None:
    from fedclient.tasks.site_data import read_prompt_completions

    good = [{"prompt": f"Q{i}?", "completion": "yes" if i % 2 else "no"} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in good) + "\n", encoding="utf-8")
    corpus = read_prompt_completions(tmp_path)
    assert corpus.classes == ("no", "yes") and corpus.texts[1] == "Q1?" and corpus.labels.tolist() == [0, 1, 0, 1]
    (tmp_path / "b.jsonl").write_text('{"prompt": "Q?", "completion": ""}\n{"completion": "x"}\n'
                                      '{"prompt": "Q?", "completion": "x", "split": "dev"}\n', encoding="utf-8")
    with pytest.raises(SiteDataError) as err:
        read_prompt_completions(tmp_path)
    message = str(err.value)
    assert message.startswith("3 problem(s)")
    assert "b.jsonl:1: empty or missing completion" in message and "b.jsonl:2: empty or missing prompt" in message
    assert "b.jsonl:3: split 'dev'" in message
    with pytest.raises(SiteDataError, match=r"no \*\.jsonl file"):
        read_prompt_completions(tmp_path / "missing")
