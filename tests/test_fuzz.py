"""Every reader fuzzed with hypothesis: each generated input, valid or malformed, parses or raises
Llama2VecError naming the file (and the line, when the problem is in one); nothing else escapes.
Valid inputs must also read back as what was generated, so the test is not vacuous.

Fixed seed (derandomize) and example count, so that every run is the same and stays within the
suite's time budget. Strategies are built once at import: building them inside a draw costs a
validation each time and doubled the run time.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import re
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llama2vec.config import (
    FINETUNE_CONFIGS,
    DataConfig,
    ModelConfig,
    PretextConfig,
    PromptConfig,
    TrainConfig,
    build_configs,
    load_config_file,
)
from llama2vec.data import Document, read_documents
from llama2vec.errors import Llama2VecError
from llama2vec.formats import (
    BeirDataset,
    TrainExample,
    read_beir,
    read_corpus,
    read_qrels,
    read_queries,
    read_run,
    read_train,
)
from llama2vec.prompts import CONFIG_NAME, PromptSpec

EXAMPLES = 500
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])
ADAPT_CONFIGS = (ModelConfig, PromptConfig, PretextConfig, DataConfig, TrainConfig)
BOM = b"\xef\xbb\xbf"
ANY = None  # Case.expected of an input that may be read or refused


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_names = itertools.count()


def new_path(folder: Path, suffix: str) -> Path:
    return folder / f"f{next(_names)}{suffix}"


@dataclass
class Case:
    data: bytes
    expected: Any = ANY  # what a valid input reads as
    bad_line: int | None = None  # the line of an input that must be refused there
    options: dict = field(default_factory=dict)  # what else the test needs to know


def outcome(read: Callable[[], Any], path: Path, n_lines: int | None = None) -> tuple[Any, str | None]:
    """(result, None), or (None, message) of a Llama2VecError that names `path` and, when it names
    a line, one that exists. Any other exception escapes and fails the test."""
    try:
        return read(), None
    except Llama2VecError as e:
        message = str(e)
    assert message.startswith(str(path)), message
    line = re.match(re.escape(str(path)) + r":(\d+): ", message)
    if line and n_lines is not None:
        assert 1 <= int(line.group(1)) <= n_lines, message
    return None, message


def writable(*values: Any) -> bool:
    """Strings that UTF-8 can write: no lone surrogate ("\\ud800" in JSON) gets through."""
    try:
        return all(isinstance(v, str) and v.encode("utf-8") is not None for v in values)
    except UnicodeEncodeError:
        return False


def check(read: Callable[[Path], Any], path: Path, case: Case, sound: Callable[[Any], bool] | None = None) -> None:
    """Read `case` from `path`: a valid case reads back, a bad line is refused there, and whatever
    is read is `sound` (the right types, text that can be written)."""
    path.write_bytes(case.data)
    result, error = outcome(lambda: read(path), path, case.data.count(b"\n") + 1)
    if error is None and sound is not None:
        assert sound(result), result
    if case.bad_line is not None:
        event("bad line: refused")
        assert error is not None and error.startswith(f"{path}:{case.bad_line}: "), error
    elif case.expected is not ANY:
        event("valid: read back")
        assert error is None, error
        assert result == case.expected
    else:
        event(f"malformed: {'read' if error is None else 'refused'}")


# --------------------------------------------------------------------------------------------
# Building blocks

texts = st.text(max_size=10)
# No subnormals: conftest.py flushes them to zero (torch.set_flush_denormal).
finite_floats = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
# Whitespace-free ids for the TSV / TREC formats (str.split() splits on Zs, Zl, Zp and some Cc).
tokens = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                               exclude_characters="\ufeff"), min_size=1, max_size=6)
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), finite_floats, texts),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=4)
not_strings = json_values.filter(lambda v: not isinstance(v, str))
bad_ids = json_values.filter(lambda v: not isinstance(v, str) and (isinstance(v, bool) or not isinstance(v, int)))
blank_lines = st.sampled_from([b"", b" ", b"\t", b" \t  "])
surrogates = st.sampled_from(["\\ud800", "\\udbff", "\\udc00", "\\udfff"])
one_in_five = st.integers(0, 4)
line_ends = st.sampled_from([b"\n", b"\r\n"])
BAD_UTF8 = [b"\xff", b"\xc3", b"\xe9 ", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]
bad_utf8 = st.sampled_from(BAD_UTF8)
BROKEN_JSON = [
    "{", "}", "[", '{"text": "a",}', "{'text': 'x'}", '{"text" "x"}', '{"text": x}', "nul", "tru", '"unterminated',
    '{"text": "a"} trailing', "{}{}", '{"text": "\\x"}', '{"text": "\\u12"}', "01", "-", "1.", ".5", "+1", "0x10",
    '{"a": NaN}', '{"a": [Infinity]}', '{"a": -Infinity}', '{"a": {"b": NaN}}',
]
broken_json_lines = st.one_of(
    st.sampled_from(BROKEN_JSON),
    # Over Python's 4300-digit limit (a ValueError, not a JSONDecodeError) and nested deeper than
    # the recursion limit; built lazily so that a failure report stays short.
    st.integers(4301, 4400).map(lambda n: '{"a": 1' + "0" * n + "}"),
    st.integers(3000, 5000).map(lambda n: '{"a": ' + "[" * n + "]" * n + "}"),
    not_strings.filter(lambda v: not isinstance(v, dict)).map(json.dumps),  # not an object
    texts.map(json.dumps),
    st.builds(lambda a, b, c: b'{"text": "' + a + b + c + b'"}', st.sampled_from([b"", b"ok "]), bad_utf8,
              st.sampled_from([b"", b" ok"])),
)


def lone_surrogate_line(name: str, base: dict) -> st.SearchStrategy[str]:
    """A JSON line whose string field `name` holds an unpaired surrogate escape."""
    head = json.dumps(base)[:-1] + (", " if base else "")
    return st.builds(lambda a, s, b: head + f'"{name}": "{a}{s}{b}"}}', st.sampled_from(["", "a"]), surrogates,
                     st.sampled_from(["", "b"]))


def layout(draw, lines: list[str | bytes], blanks: bool = True) -> tuple[bytes, list[int]]:
    """File bytes of `lines` with random blank lines (unless not `blanks`), LF or CRLF, a BOM and a
    final newline; and the line number of each given line."""
    out: list[bytes] = []
    numbers = []
    for line in lines:
        if blanks and draw(one_in_five) == 0:
            out.append(draw(blank_lines))
        numbers.append(len(out) + 1)
        out.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    if blanks and draw(one_in_five) == 0:
        out.append(draw(blank_lines))
    eol = draw(line_ends)
    data = eol.join(out) + (eol if out and draw(st.booleans()) else b"")
    return (BOM if draw(one_in_five) == 0 else b"") + data, numbers


def dumps(draw, rows: list[dict]) -> list[str]:
    ascii_only = draw(st.booleans())
    return [json.dumps(r, ensure_ascii=ascii_only) for r in rows]


@st.composite
def with_bad_line(draw, good: st.SearchStrategy[list[str]], bad: st.SearchStrategy[str | bytes]) -> Case:
    """Valid lines with one bad line put among them: it must be refused at that line."""
    lines = draw(good)
    k = draw(st.integers(0, len(lines)))
    data, numbers = layout(draw, [*lines[:k], draw(bad), *lines[k:]])
    return Case(data, bad_line=numbers[k])


mutations = st.sampled_from(["set", "insert", "delete", "truncate"])
few_bytes = st.binary(min_size=1, max_size=3)


def mutate(draw, data: bytes) -> bytes:
    """A few bytes set, inserted or cut."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(out)))
        op = draw(mutations)
        if op == "set" and at < len(out):
            out[at] = draw(st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(few_bytes)
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 3))]
        else:
            del out[at:]
    return bytes(out)


@st.composite
def mutated(draw, valid: st.SearchStrategy[Case]) -> Case:
    return Case(mutate(draw, draw(valid).data))


random_inputs = st.one_of(
    st.binary(max_size=80).map(Case),
    st.text(max_size=80).map(lambda t: Case(t.encode("utf-8"))),
    st.lists(st.text(max_size=12), max_size=5).map(lambda ls: Case("\n".join(ls).encode("utf-8"))),
)


@st.composite
def one_branch(draw, strategy: st.SearchStrategy[Case]) -> Case:
    return draw(strategy)


def garbage(*more: st.SearchStrategy[Case]) -> st.SearchStrategy[Case]:
    """Random bytes, random text and random lines, and `more`: one branch of the caller's one_of
    (wrapped, so that it is not flattened into it and crowds out the valid inputs)."""
    return one_branch(st.one_of(random_inputs, *more))


def json_lines(names: list[str]) -> st.SearchStrategy[Case]:
    """Lines of JSON objects with the reader's fields at random types."""
    objects = st.dictionaries(st.sampled_from([*names, "extra"]), json_values, max_size=len(names) + 1)
    return st.lists(objects.map(json.dumps), max_size=4).map(lambda ls: Case("\n".join(ls).encode("utf-8")))


def parses(kind: type, value: str) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


def extras(names: tuple[str, ...]) -> st.SearchStrategy[dict]:
    """Keys a reader ignores."""
    return st.dictionaries(texts.filter(lambda k: k not in names), json_values, max_size=2)


# --------------------------------------------------------------------------------------------
# Corpus files: JSONL, text, Parquet (read_documents)

DOC_FIELDS = ("text", "title", "id", "_id")


def documents_sound(docs: list[Document]) -> bool:
    return all(writable(d.id, d.title, d.text) and d.text.strip() for d in docs)


doc_extras = extras(DOC_FIELDS)
id_keys = st.sampled_from([None, "id", "_id"])
json_ids = st.one_of(texts, st.integers())


@st.composite
def corpus_row(draw) -> dict:
    obj = draw(doc_extras)
    obj["text"] = draw(texts)
    if draw(st.booleans()):
        obj["title"] = draw(texts)
    key = draw(id_keys)
    if key:
        obj[key] = draw(json_ids)
    return obj


corpus_rows = st.lists(corpus_row(), max_size=5)


@st.composite
def jsonl_documents(draw) -> Case:
    rows = draw(corpus_rows)
    data, numbers = layout(draw, dumps(draw, rows))
    docs = []
    for row, number in zip(rows, numbers):
        if row["text"].strip():
            doc_id = row["_id"] if "_id" in row else row.get("id", "")
            docs.append(Document(str(doc_id) if doc_id != "" else str(number), row.get("title", ""), row["text"]))
    return Case(data, docs)


@st.composite
def corpus_lines(draw) -> list[str]:
    return dumps(draw, draw(corpus_rows))


jsonl_document_bad_lines = st.one_of(
    broken_json_lines,
    doc_extras.map(json.dumps),  # no text
    st.builds(lambda v: json.dumps({"text": v}), not_strings),
    st.builds(lambda v: json.dumps({"text": "ok", "title": v}), not_strings),
    st.builds(lambda k, v: json.dumps({"text": "ok", k: v}), st.sampled_from(["id", "_id"]), bad_ids),
    *(lone_surrogate_line(name, {} if name == "text" else {"text": "ok"}) for name in DOC_FIELDS),
)


@FUZZ
@given(case=st.one_of(jsonl_documents(), with_bad_line(corpus_lines(), jsonl_document_bad_lines),
                      mutated(jsonl_documents()), garbage(json_lines(list(DOC_FIELDS)))))
def test_fuzz_jsonl_corpus(folder, case):
    check(lambda p: list(read_documents(p)), new_path(folder, ".jsonl"), case, documents_sound)


text_lines = st.text(st.characters(codec="utf-8", exclude_characters="\n\r\ufeff"), min_size=1, max_size=10).filter(
    lambda s: s.strip() != "")
text_blocks = st.lists(st.lists(text_lines, min_size=1, max_size=3), max_size=4)
separators = st.lists(blank_lines, min_size=1, max_size=2)


def text_documents(draw) -> tuple[list[list[str]], bytes, list[int]]:
    """Blocks of lines, the file bytes, and the line number of each line."""
    blocks = draw(text_blocks)
    lines: list[str | bytes] = [draw(blank_lines)] if draw(st.booleans()) else []
    for i, block in enumerate(blocks):
        if i:
            lines += draw(separators)
        lines += block
    data, numbers = layout(draw, lines, blanks=False)
    return blocks, data, numbers


@st.composite
def text_corpus(draw) -> Case:
    blocks, data, numbers = text_documents(draw)
    lines = data.removeprefix(BOM).split(b"\n")
    starts = [n for n in numbers if lines[n - 1].strip() and (n == 1 or not lines[n - 2].strip())]
    return Case(data, options={"blocks": blocks, "starts": starts})


@st.composite
def text_bad_line(draw) -> Case:
    """Bytes that are not UTF-8 on one line of a text corpus."""
    lines = text_documents(draw)[1].split(b"\n")
    k = draw(st.integers(0, len(lines) - 1))
    lines[k] += draw(bad_utf8)
    return Case(b"\n".join(lines), bad_line=k + 1)


@FUZZ
@given(case=st.one_of(text_corpus(), text_bad_line(), mutated(text_corpus()), garbage()))
def test_fuzz_text_corpus(folder, case):
    path = new_path(folder, ".txt")
    if "blocks" in case.options:  # valid: the documents are the blocks, named by their first line
        docs = [Document(f"{path.name}:{start}", "", "\n".join(block))
                for block, start in zip(case.options["blocks"], case.options["starts"])]
        case = Case(case.data, docs)
    check(lambda p: list(read_documents(p)), path, case, documents_sound)


ARROW = {
    "string": (pa.string(), texts),
    "large_string": (pa.large_string(), texts),
    "int": (pa.int64(), st.integers(-2**63, 2**63 - 1)),
    "float": (pa.float64(), st.floats(allow_subnormal=False)),
    "bool": (pa.bool_(), st.booleans()),
    "binary": (pa.binary(), st.binary(max_size=6)),
    "list": (pa.list_(pa.string()), st.lists(texts, max_size=2)),
    "null": (pa.null(), st.none()),
}
arrow_values = {kind: st.none() | values for kind, (_, values) in ARROW.items()}
arrow_kinds = st.sampled_from(list(ARROW))
text_kinds = st.sampled_from(["string", "large_string"])
id_kinds = st.sampled_from(["string", "int"])
not_text_kinds = st.sampled_from(["int", "float", "bool", "binary", "list"])
extra_columns = st.lists(st.sampled_from(["body", "x", "score"]), max_size=2, unique=True)
column_names = st.lists(st.sampled_from(["text", "title", "id", "body"]) | texts, min_size=1, max_size=4)


def arrow_column(draw, n: int, kind: str) -> pa.Array:
    return pa.array([draw(arrow_values[kind]) for _ in range(n)], type=ARROW[kind][0])


def parquet_bytes(columns: list[tuple[str, pa.Array]], row_group_size: int) -> bytes:
    table = pa.Table.from_arrays([a for _, a in columns], names=[n for n, _ in columns])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


@st.composite
def parquet_documents(draw) -> Case:
    """'text', 'title' and 'id' columns of the right types, plus others, in any order."""
    n = draw(st.integers(0, 6))
    columns = {"text": arrow_column(draw, n, draw(text_kinds))}
    if draw(st.booleans()):
        columns["title"] = arrow_column(draw, n, "string")
    if draw(st.booleans()):
        columns["id"] = arrow_column(draw, n, draw(id_kinds))
    for name in draw(extra_columns):
        columns[name] = arrow_column(draw, n, draw(arrow_kinds))
    order = draw(st.permutations(list(columns)))
    data = parquet_bytes([(name, columns[name]) for name in order], draw(st.integers(1, 4)))
    docs = []
    for row in range(n):
        text = columns["text"][row].as_py()
        if text and text.strip():
            title = columns["title"][row].as_py() if "title" in columns else None
            doc_id = columns["id"][row].as_py() if "id" in columns else None
            docs.append(Document(str(row + 1 if doc_id is None else doc_id), title or "", text))
    return Case(data, docs)


@st.composite
def parquet_any_columns(draw) -> Case:
    """Random column names (duplicates too) and types: string, int, float, bool, binary, list, null."""
    n = draw(st.integers(0, 5))
    columns = [(name, arrow_column(draw, n, draw(arrow_kinds))) for name in draw(column_names)]
    return Case(parquet_bytes(columns, draw(st.integers(1, 3))))


BAD_KINDS = {"text": not_text_kinds, "title": not_text_kinds,
             "id": st.sampled_from(["float", "bool", "binary", "list"])}
bad_columns = st.sampled_from(list(BAD_KINDS))


@st.composite
def parquet_bad_column(draw) -> Case:
    """A 'text', 'title' or 'id' column of a wrong type: refused at its first non-null row."""
    n = draw(st.integers(1, 5))
    name = draw(bad_columns)
    column = arrow_column(draw, n, draw(BAD_KINDS[name]))
    values = column.to_pylist()
    columns = [(name, column)] if name == "text" else [("text", pa.array(["t"] * n)), (name, column)]
    data = parquet_bytes(columns, draw(st.integers(1, 3)))
    if all(v is None for v in values):  # no value, no wrong type
        return Case(data, [] if name == "text" else [Document(str(row), "", "t") for row in range(1, n + 1)])
    return Case(data, options={"row": next(i for i, v in enumerate(values) if v is not None) + 1})


@FUZZ
@given(case=st.one_of(parquet_documents(), parquet_any_columns(), parquet_bad_column(), mutated(parquet_documents()),
                      garbage()))
def test_fuzz_parquet_corpus(folder, case):
    path = new_path(folder, ".parquet")
    path.write_bytes(case.data)
    result, error = outcome(lambda: list(read_documents(path)), path)
    assert error is not None or documents_sound(result), result
    if "row" in case.options:
        event("bad row: refused")
        assert error is not None and error.startswith(f"{path}: row {case.options['row']}: "), error
    elif case.expected is not ANY:
        event("valid: read back")
        assert error is None, error
        assert result == case.expected
    else:
        event(f"malformed: {'read' if error is None else 'refused'}")


# --------------------------------------------------------------------------------------------
# BEIR corpus, queries and qrels


@st.composite
def beir_row(draw, title: bool) -> dict:
    obj = draw(doc_extras)
    obj["_id"] = draw(json_ids)
    if title and draw(st.booleans()):
        obj["title"] = draw(texts)
    obj["text"] = draw(texts)
    return obj


BEIR_ROWS = {title: st.lists(beir_row(title), max_size=4, unique_by=lambda r: str(r["_id"])) for title in (True, False)}


@st.composite
def beir_jsonl(draw, title: bool) -> Case:
    rows = draw(BEIR_ROWS[title])
    data, _ = layout(draw, dumps(draw, rows))
    if title:
        return Case(data, {str(r["_id"]): {"title": r.get("title", ""), "text": r["text"]} for r in rows})
    return Case(data, {str(r["_id"]): r["text"] for r in rows})


@st.composite
def beir_lines(draw, title: bool) -> list[str]:
    return dumps(draw, draw(BEIR_ROWS[title]))


@st.composite
def duplicate_id(draw, title: bool) -> Case:
    """A repeated _id (7 and "7" are the same id): refused at the second one."""
    rows = draw(BEIR_ROWS[title].filter(bool))
    k = draw(st.integers(1, len(rows)))
    again = rows[draw(st.integers(0, k - 1))]["_id"]
    twin = str(again) if isinstance(again, int) and draw(st.booleans()) else again
    data, numbers = layout(draw, dumps(draw, [*rows[:k], {"_id": twin, "text": "again"}, *rows[k:]]))
    return Case(data, bad_line=numbers[k])


def beir_bad_lines(title: bool) -> st.SearchStrategy[str | bytes]:
    ok = {"_id": "x", "text": "ok"}
    strings = ["_id", "text", "title"] if title else ["_id", "text"]  # queries.jsonl has no title to check
    return st.one_of(
        broken_json_lines,
        st.builds(lambda o, drop: json.dumps({k: v for k, v in {**o, **ok}.items() if k != drop}), doc_extras,
                  st.sampled_from(["_id", "text"])),  # a required field missing
        st.builds(lambda v: json.dumps({**ok, "_id": v}), bad_ids),
        st.builds(lambda k, v: json.dumps({**ok, k: v}), st.sampled_from(strings[1:]), not_strings),
        *(lone_surrogate_line(name, {k: v for k, v in ok.items() if k != name}) for name in strings),
    )


def beir_cases(title: bool) -> st.SearchStrategy[Case]:
    return st.one_of(beir_jsonl(title), duplicate_id(title), with_bad_line(beir_lines(title), beir_bad_lines(title)),
                     mutated(beir_jsonl(title)), garbage(json_lines(["_id", "title", "text"])))


@FUZZ
@given(case=beir_cases(title=True))
def test_fuzz_beir_corpus(folder, case):
    check(read_corpus, new_path(folder, ".jsonl"), case,
          lambda corpus: all(writable(k, d["title"], d["text"]) and set(d) == {"title", "text"}
                             for k, d in corpus.items()))


@FUZZ
@given(case=beir_cases(title=False))
def test_fuzz_beir_queries(folder, case):
    check(read_queries, new_path(folder, ".jsonl"), case, lambda queries: all(writable(*q) for q in queries.items()))


SEPARATORS = st.sampled_from(["\t", " ", " \t", "  "])
qrels_rows = st.lists(st.tuples(tokens, tokens, st.integers(-2, 10**12)), max_size=5)


def qrels_lines(draw, tsv: bool) -> tuple[list[str], dict]:
    sep = draw(SEPARATORS)
    lines = [sep.join(["query-id", "corpus-id", "score"])] if tsv else []
    qrels: dict = {}
    for q, d, score in draw(qrels_rows):
        trec = not tsv or draw(st.booleans())  # TREC qrels (q 0 d score) are read from .tsv files too
        lines.append(sep.join([q, "0", d, str(score)] if trec else [q, d, str(score)]))
        qrels.setdefault(q, {})[d] = score
    return lines, qrels


@st.composite
def qrels_file(draw) -> Case:
    tsv = draw(st.booleans())
    lines, qrels = qrels_lines(draw, tsv)
    return Case(layout(draw, lines)[0], qrels, options={"suffix": ".tsv" if tsv else ".qrels"})


qrels_bad_lines = st.one_of(
    st.lists(tokens, min_size=1, max_size=2).map(" ".join),  # too few columns
    st.lists(tokens, min_size=5, max_size=7).map("\t".join),  # too many
    st.builds(lambda q, d, s, sep: sep.join([q, d, s]), tokens, tokens,
              st.sampled_from(["1.5", "high", "nan", "1e3", "0x1"]) | tokens.filter(lambda s: not parses(int, s))
              | st.integers(4301, 4400).map(lambda n: "1" + "0" * n), SEPARATORS),  # a score that is no integer
    st.sampled_from([b"q\td\t\xff", b"\xfe\td\t1"]),
).filter(lambda line: not (isinstance(line, str) and line.split()[:1] == ["query-id"]))


@st.composite
def qrels_with_bad_line(draw) -> Case:
    tsv = draw(st.booleans())
    lines = qrels_lines(draw, tsv)[0]
    k = draw(st.integers(0, len(lines)))  # before the header of a .tsv: refused as a missing header
    data, numbers = layout(draw, [*lines[:k], draw(qrels_bad_lines), *lines[k:]])
    return Case(data, bad_line=numbers[k], options={"suffix": ".tsv" if tsv else ".qrels"})


@FUZZ
@given(case=st.one_of(qrels_file(), qrels_with_bad_line(), mutated(qrels_file()), garbage()),
       suffix=st.sampled_from([".tsv", ".qrels"]))
def test_fuzz_beir_qrels(folder, case, suffix):
    check(read_qrels, new_path(folder, case.options.get("suffix", suffix)), case,
          lambda qrels: all(writable(q, d) and type(s) is int for q, docs in qrels.items() for d, s in docs.items()))


beir_ids = st.lists(tokens, max_size=4, unique=True)
file_variants = st.sampled_from(["valid"] * 8 + ["garbage", "missing", "folder"])


@st.composite
def beir_folder(draw, folder: Path) -> tuple[Path, Any]:
    """corpus.jsonl, queries.jsonl and qrels/test.tsv, each valid, garbage, missing or a folder."""
    path = new_path(folder, "")
    corpus = {k: (draw(texts), draw(texts)) for k in draw(beir_ids)}
    queries = {k: draw(texts) for k in draw(beir_ids)}
    consistent = draw(one_in_five) > 0
    docs = list(corpus) if consistent else [*corpus, "unknown-doc"]
    qrels: dict = {}
    for q in queries:
        judged = {d: draw(st.integers(0, 3)) for d in docs if draw(st.booleans())}
        if judged and draw(st.booleans()):
            qrels[q] = judged
    if not consistent:
        qrels.setdefault("unknown-query", {})["d"] = 1
    files = {
        "corpus.jsonl": "".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n" for k, (t, x) in corpus.items()),
        "queries.jsonl": "".join(json.dumps({"_id": k, "text": x}) + "\n" for k, x in queries.items()),
        "qrels/test.tsv": "query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t{s}\n" for q, judged in qrels.items() for d, s in judged.items()),
    }
    if draw(st.integers(0, 9)) == 0:
        return path, ANY  # no folder at all
    valid = consistent
    for name, text in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        variant = draw(file_variants)
        valid &= variant == "valid"
        if variant == "valid":
            target.write_text(text, encoding="utf-8")
        elif variant == "garbage":
            target.write_bytes(mutate(draw, text.encode("utf-8")) if draw(st.booleans()) else draw(random_inputs).data)
        elif variant == "folder":
            target.mkdir()
    if not valid:
        return path, ANY
    return path, BeirDataset({k: {"title": t, "text": x} for k, (t, x) in corpus.items()},
                             {q: queries[q] for q in qrels}, qrels)


@FUZZ
@given(data=st.data())
def test_fuzz_beir_folder(folder, data):
    path, expected = data.draw(beir_folder(folder))
    result, error = outcome(lambda: read_beir(path, "test"), path)
    if expected is not ANY:
        event("valid: read back")
        assert error is None, error
        assert result == expected
    else:
        event(f"malformed: {'read' if error is None else 'refused'}")


# --------------------------------------------------------------------------------------------
# Training JSONL

train_extras = extras(("query", "pos", "neg"))
queries_text = texts.filter(lambda s: s.strip() != "")
passages = st.lists(texts, max_size=3)


@st.composite
def train_row(draw, min_negatives: int) -> dict:
    obj = draw(train_extras)
    obj["query"] = draw(queries_text)
    obj["pos"] = [draw(texts)] + draw(passages)
    if min_negatives or draw(st.booleans()):
        obj["neg"] = [draw(texts) for _ in range(min_negatives)] + draw(passages)
    return obj


TRAIN_ROWS = {n: st.lists(train_row(n), max_size=4) for n in range(3)}


@st.composite
def train_file(draw) -> Case:
    min_negatives = draw(st.integers(0, 2))
    rows = [draw(train_row(min_negatives))] + draw(TRAIN_ROWS[min_negatives])
    data, _ = layout(draw, dumps(draw, rows))
    examples = [TrainExample(r["query"], r["pos"], r.get("neg", [])) for r in rows]
    return Case(data, examples, options={"min_negatives": min_negatives})


not_string_lists = not_strings.filter(lambda v: not (isinstance(v, list) and all(isinstance(x, str) for x in v)))


def train_bad_lines(min_negatives: int) -> st.SearchStrategy[str | bytes]:
    ok = {"query": "q", "pos": ["p"], "neg": ["n"] * min_negatives}
    return st.one_of(
        broken_json_lines,
        st.builds(lambda drop: json.dumps({k: v for k, v in ok.items() if k != drop}),
                  st.sampled_from(["query", "pos"])),
        st.builds(lambda v: json.dumps({**ok, "query": v}), not_strings | st.sampled_from(["", "  ", "\t"])),
        st.builds(lambda k, v: json.dumps({**ok, k: v}), st.sampled_from(["pos", "neg"]), not_string_lists),
        st.builds(lambda k, v: json.dumps({**ok, k: ["ok", v]}), st.sampled_from(["pos", "neg"]), not_strings),
        st.just(json.dumps({**ok, "pos": []})),
        *(st.builds(lambda s, name=name: json.dumps({k: v for k, v in ok.items() if k != name})[:-1]
                    + f', "{name}": ["a{s}"]}}', surrogates) for name in ("pos", "neg")),
        lone_surrogate_line("query", {"pos": ["p"], "neg": ["n"] * min_negatives}),
        *([st.just(json.dumps({**ok, "neg": ["n"] * (min_negatives - 1)}))] if min_negatives else []),
    )


TRAIN_BAD_LINES = {n: train_bad_lines(n) for n in range(3)}


@st.composite
def train_with_bad_line(draw) -> Case:
    n = draw(st.integers(0, 2))
    lines = dumps(draw, draw(TRAIN_ROWS[n]))
    k = draw(st.integers(0, len(lines)))
    data, numbers = layout(draw, [*lines[:k], draw(TRAIN_BAD_LINES[n]), *lines[k:]])
    return Case(data, bad_line=numbers[k], options={"min_negatives": n})


@FUZZ
@given(case=st.one_of(train_file(), train_with_bad_line(), mutated(train_file()),
                      garbage(json_lines(["query", "pos", "neg"]))),
       min_negatives=st.integers(0, 2))
def test_fuzz_training_jsonl(folder, case, min_negatives):
    n = case.options.get("min_negatives", min_negatives)
    check(lambda p: read_train(p, min_negatives=n), new_path(folder, ".jsonl"), case,
          lambda examples: examples and all(writable(e.query, *e.pos, *e.neg) and e.query.strip() and e.pos
                                            and len(e.neg) >= n for e in examples))


# --------------------------------------------------------------------------------------------
# TREC runs

run_rows = st.lists(st.tuples(tokens, tokens, st.integers(0, 1000), finite_floats, tokens), max_size=5)


def run_lines(draw) -> tuple[list[str], dict]:
    sep = draw(SEPARATORS)
    lines, run = [], {}
    for q, d, rank, score, tag in draw(run_rows):
        lines.append(sep.join([q, "Q0", d, str(rank), repr(score), tag]))
        run.setdefault(q, {})[d] = score
    return lines, run


@st.composite
def run_file(draw) -> Case:
    lines, run = run_lines(draw)
    return Case(layout(draw, lines)[0], run)


@st.composite
def run_good_lines(draw) -> list[str]:
    return run_lines(draw)[0]


run_bad_lines = st.one_of(
    st.lists(tokens, min_size=1, max_size=5).map(" ".join),
    st.lists(tokens, min_size=7, max_size=9).map(" ".join),
    st.sampled_from(["nan", "NaN", "inf", "-Infinity", "1e999", "x", "1,5", "0x1"]).map(lambda s: f"q Q0 d 1 {s} tag"),
    st.just(b"q Q0 d 1 \xff tag"),
)


@FUZZ
@given(case=st.one_of(run_file(), with_bad_line(run_good_lines(), run_bad_lines), mutated(run_file()), garbage()))
def test_fuzz_trec_run(folder, case):
    check(read_run, new_path(folder, ".trec"), case,
          lambda run: all(writable(q, d) and math.isfinite(s) for q, docs in run.items() for d, s in docs.items()))


# --------------------------------------------------------------------------------------------
# YAML and JSON config files

# Characters that YAML writes and reads back unchanged (no line breaks, controls or BOMs).
yaml_texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cf", "Zl", "Zp", "Co", "Cn")),
                     max_size=8)
option_names = st.text("abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=8)
option_values = st.one_of(st.none(), st.booleans(), st.integers(), finite_floats, yaml_texts)
option_mappings = st.dictionaries(option_names, option_values | st.dictionaries(option_names, option_values,
                                                                                max_size=3), max_size=5)


def dump(data: Any, suffix: str, style: int) -> bytes:
    if suffix == ".json":
        return json.dumps(data, indent=style or None, ensure_ascii=bool(style % 2)).encode("utf-8")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=bool(style % 2),
                          default_flow_style=[False, None, True][style]).encode("utf-8")


@st.composite
def config_file(draw, suffix: str) -> Case:
    """A flat or grouped mapping; it reads as the flat options it stands for."""
    data = draw(option_mappings)
    flat = {}
    for key, value in data.items():
        for name, v in (value.items() if isinstance(value, dict) else [(key, value)]):
            flat[name.replace("-", "_")] = v
    return Case(dump(data, suffix, draw(st.integers(0, 2))), flat)


BROKEN_YAML = [
    "a: [1, 2", "a: {b: 1", "\ta: 1", "a: b: c", "- x\na: 1", "a: 'x", 'a: "x', "a:\n- 1\n b: 2", "? [a, b]\n: 1",
    "a: &x 1\nb: *y", "%YAML 9.9\n---\na: 1", "a: 1\n---\nb: 2", "a: !!int abc", "a: !!bool maybe", "a: !!float x",
    "a: !!binary '!!!'", "a: !!timestamp x", "a: !!python/object:os.system x", "a: !!set x", "a: 2024-13-45",
    "a: 2001-02-30 10:00:00", "1: one", "null: x", "[1, 2]: x", "? {a: 1}\n: x", "true: {1: 2}", 'a: "\\ud800"',
    "a: \x00", "a: \x07", "a: &a [*a]", "- a\n- b", "'just a string'", "42", "a: {b: {c: 1}}", "{a: 1, a: 2}",
    "!!map {a: 1}",
]
BROKEN_CONFIG_JSON = [
    "{", "[1, 2]", '"x"', "null", '{"a": NaN}', '{"a": Infinity}', '{"a": "\\ud800"}', '{"a": 1,}', "{'a': 1}",
    '{"a": 1}\n{"b": 2}', '{"a": {"b": [1]}}', '{"a": 1}  // comment', "\ufeff\ufeff{}", '{"a": "\\x"}',
]


def broken_snippets(suffix: str) -> st.SearchStrategy[str]:
    """Broken YAML or JSON, an integer over 4300 digits, and nesting deeper than the recursion limit."""
    huge = st.integers(4301, 4400).map(lambda n: "1" + "0" * n)
    if suffix == ".json":
        deep = st.integers(3000, 4000).map(lambda n: "[" * n + "]" * n)
        return st.one_of(st.sampled_from(BROKEN_CONFIG_JSON), huge.map(lambda v: '{"a": ' + v + "}"), deep)
    deep = st.integers(600, 700).map(lambda n: "[" * n + "]" * n)  # PyYAML is quadratic in the depth
    return st.one_of(st.sampled_from(BROKEN_YAML), huge.map(lambda v: "a: " + v), huge.map(lambda v: "a: !!int " + v),
                     deep.map(lambda v: "a: " + v))


@st.composite
def broken_config(draw, broken: st.SearchStrategy[str], suffix: str) -> Case:
    """A broken snippet put among the lines of a valid file."""
    lines = draw(config_file(suffix)).data.decode("utf-8").splitlines()
    lines.insert(draw(st.integers(0, len(lines))), draw(broken))
    return Case("\n".join(lines).encode("utf-8", "surrogatepass"))


def config_cases(suffix: str) -> st.SearchStrategy[Case]:
    broken = broken_snippets(suffix)
    words = st.lists(option_names.map(lambda k: k + ": ") | yaml_texts | st.sampled_from(["\n", "  ", "- ", "{", "["]),
                     max_size=6)
    return st.one_of(config_file(suffix), broken_config(broken, suffix), mutated(config_file(suffix)),
                     garbage(words.map(lambda ws: Case("".join(ws).encode("utf-8")))))


@FUZZ
@given(case=config_cases(".yaml"), suffix=st.sampled_from([".yaml", ".yml", ".cfg"]))
def test_fuzz_yaml_config(folder, case, suffix):
    check(load_config_file, new_path(folder, suffix), case)


@FUZZ
@given(case=config_cases(".json"))
def test_fuzz_json_config(folder, case):
    check(load_config_file, new_path(folder, ".json"), case)


CHOICES = {"dtype": ["auto", "float32", "bfloat16", "float16"], "attn_implementation": ["sdpa", "eager"],
           "prompt_preset": ["llara", "paper"], "query_prompt": ["next", "self"], "pooling": [None, "mean", "last"],
           "precision": ["auto", "fp32", "bf16-mixed", "bf16"],
           # --fsdp goes with --full alone (finetune trains LoRA by default), --fsdp-offload with --fsdp
           "fsdp": [False], "fsdp_offload": [False]}


@functools.cache
def field_values(hint: Any, name: str, allow_none: bool = True) -> st.SearchStrategy[tuple[Any, Any]]:
    """(value written in the file, value the config must hold) for a valid option value. Numbers
    may be written as text ("5e-05"), as on the command line."""
    if name in CHOICES:
        return st.sampled_from([c for c in CHOICES[name] if allow_none or c is not None]).map(lambda v: (v, v))
    base = next(a for a in (*typing.get_args(hint), hint) if a is not type(None))
    optional = st.just((None, None)) if allow_none and type(None) in typing.get_args(hint) else st.nothing()
    if base is bool:
        values = st.booleans().map(lambda v: (v, v))
    elif base is int:
        values = st.integers(1, 10**9).flatmap(lambda v: st.sampled_from([(v, v), (str(v), v)]))
    elif base is float:
        values = st.floats(1e-9, 1e6).flatmap(
            lambda v: st.sampled_from([(v, v), (repr(v), v), (int(v) or 1, float(int(v) or 1))]))
    else:
        values = yaml_texts.map(lambda v: (v, v))
    return optional | values


wrong_values = st.one_of(json_values, st.sampled_from(["abc", "", "1.5", "nan", "inf", "-1", "0", "yes", 10**400, -5,
                                                       0, -1.5, 1e308, [1], {"a": 1}, True, "\ud800", "2" * 4400]))


@functools.cache
def config_fields(classes: tuple[type, ...]) -> tuple[dict[str, tuple[type, Any]], st.SearchStrategy[list[str]]]:
    """Field name -> (class, type hint), and a strategy for a few field names."""
    group_of = {f.name: (cls, typing.get_type_hints(cls)[f.name]) for cls in classes for f in fields(cls)}
    return group_of, st.lists(st.sampled_from(sorted(group_of)), max_size=6, unique=True)


CLASS_SETS = st.sampled_from([ADAPT_CONFIGS, FINETUNE_CONFIGS])
wrong_names = st.lists(st.sampled_from(sorted(f.name for cls in (*ADAPT_CONFIGS, *FINETUNE_CONFIGS)
                                              for f in fields(cls))) | option_names, min_size=1, max_size=2)


@st.composite
def options_file(draw, folder: Path) -> tuple[Path, tuple[type, ...], dict, dict | None]:
    """A config file for `adapt` or `finetune`: valid values, or some of a wrong type or unknown.
    Returns the file, the classes, the flags given and the expected values (None: may fail)."""
    classes = draw(CLASS_SETS)
    group_of, some_names = config_fields(classes)
    names = draw(some_names)
    written, expected = {}, {}
    for name in names:
        written[name], expected[name] = draw(field_values(group_of[name][1], name))
    if written.get("overwrite") and written.get("resume"):
        written["resume"] = expected["resume"] = False
    valid = draw(st.integers(0, 2)) > 0
    if not valid:
        for name in draw(wrong_names):
            written[name] = draw(wrong_values)
    grouped: dict = {}
    for name, value in written.items():
        group = group_of[name][0].__name__.removesuffix("Config").lower() if name in group_of else None
        if group and group not in group_of and draw(st.booleans()):  # no group "model": it is an option
            grouped.setdefault(group, {})[name] = value
        else:
            grouped[name] = value
    suffix = draw(st.sampled_from([".yaml", ".json"]))
    path = new_path(folder, suffix)
    text = json.dumps(grouped, allow_nan=False) if suffix == ".json" else yaml.safe_dump(grouped)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    flags = {}
    if names and draw(st.booleans()):  # a flag overrides the file
        name = draw(st.sampled_from(names))
        value = draw(field_values(group_of[name][1], name, allow_none=False))[1]
        if name in ("overwrite", "resume") and expected.get("resume" if name == "overwrite" else "overwrite"):
            value = False
        flags[name] = expected[name] = value
    return path, classes, flags, expected if valid else None


def holds_type(value: Any, hint: Any) -> bool:
    if value is None:
        return type(None) in typing.get_args(hint)
    base = next(a for a in (*typing.get_args(hint), hint) if a is not type(None))
    if base is float:
        return isinstance(value, float) and math.isfinite(value)
    return type(value) is base


@FUZZ
@given(data=st.data())
def test_fuzz_config_values(folder, data):
    path, classes, flags, expected = data.draw(options_file(folder))
    result, error = outcome(lambda: build_configs(argparse.Namespace(config=path, **flags), *classes), path)
    if expected is not None:
        event("valid: read back")
        assert error is None, error
    else:
        event(f"malformed: {'read' if error is None else 'refused'}")
    for config in result or []:
        hints = typing.get_type_hints(type(config))
        for f in fields(config):
            value = getattr(config, f.name)
            assert holds_type(value, hints[f.name]), (f.name, value)  # a wrong type never gets through
            if expected and f.name in expected:
                assert value == expected[f.name], (f.name, value, expected[f.name])


# --------------------------------------------------------------------------------------------
# llama2vec_config.json (PromptSpec.load)

token_names = texts.filter(bool)
poolings = st.sampled_from(["mean", "last"])
query_tasks = st.sampled_from(["next", "self"])
lengths = st.integers(1, 10**6)


@st.composite
def prompt_specs(draw) -> PromptSpec:
    k = draw(st.integers(1, 3))
    return PromptSpec(prefix=draw(texts), self_suffix=draw(texts), next_suffix=draw(texts),
                      self_tokens=[draw(token_names) for _ in range(k)],
                      next_tokens=[draw(token_names) for _ in range(k)], pooling=draw(poolings), preset=draw(texts),
                      max_length=draw(lengths), query_max_length=draw(st.none() | lengths),
                      query_task=draw(query_tasks))


@st.composite
def spec_file(draw) -> Case:
    spec = draw(prompt_specs())
    text = json.dumps(asdict(spec), indent=draw(st.sampled_from([None, 2])), ensure_ascii=draw(st.booleans()))
    return Case(text.encode("utf-8"), spec)


SPEC_FIELDS = [f.name for f in fields(PromptSpec)]
spec_changes = st.lists(st.tuples(st.sampled_from([*SPEC_FIELDS, "extra"]), st.sampled_from(["set", "set", "drop"])),
                        min_size=1, max_size=2)


@st.composite
def spec_wrong_field(draw) -> Case:
    """A saved spec with fields dropped, added or given a value of a wrong type."""
    data = asdict(draw(prompt_specs()))
    for name, action in draw(spec_changes):
        if action == "drop":
            data.pop(name, None)
        else:
            data[name] = draw(wrong_values)
    return Case(json.dumps(data, allow_nan=False).encode("utf-8", "surrogatepass"))


@FUZZ
@given(case=st.one_of(spec_file(), spec_wrong_field(), mutated(spec_file()),
                      garbage(broken_snippets(".json").map(lambda t: Case(t.encode("utf-8", "surrogatepass"))),
                              json_lines(SPEC_FIELDS))))
def test_fuzz_prompt_spec(folder, case):
    model = new_path(folder, "")
    model.mkdir()
    check(lambda p: PromptSpec.load(p.parent), model / CONFIG_NAME, case, spec_sound)


def spec_sound(spec: PromptSpec) -> bool:
    """What encoding relies on: the field types, K tokens for each task, known choices."""
    lengths = (spec.max_length, spec.query_max_length or 1)
    return (isinstance(spec.self_tokens, list) and isinstance(spec.next_tokens, list)
            and writable(spec.prefix, spec.self_suffix, spec.next_suffix, spec.preset, *spec.self_tokens,
                         *spec.next_tokens)
            and 0 < len(spec.self_tokens) == len(spec.next_tokens) and all(spec.self_tokens + spec.next_tokens)
            and spec.pooling in ("mean", "last") and spec.query_task in ("next", "self")
            and all(type(n) is int and n > 0 for n in lengths))


# --------------------------------------------------------------------------------------------
# Regressions: inputs that escaped as another exception, or were silently accepted


def test_prompt_spec_missing_or_a_folder(tmp_path):
    path = tmp_path / CONFIG_NAME
    with pytest.raises(Llama2VecError, match=re.escape(f"{path}: missing")):
        PromptSpec.load(tmp_path)
    path.mkdir()
    with pytest.raises(Llama2VecError, match=re.escape(f"{path}: is a folder")):
        PromptSpec.load(tmp_path)


def test_duplicate_query_ids_are_an_error(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"_id": "q1", "text": "one"}\n\n{"_id": "q1", "text": "again"}\n')
    with pytest.raises(Llama2VecError, match=re.escape(f"{path}:3: duplicate _id 'q1'")):
        read_queries(path)
    path.write_text('{"_id": 7, "text": "one"}\n{"_id": "7", "text": "again"}\n')
    with pytest.raises(Llama2VecError, match=re.escape(f"{path}:2: duplicate _id '7'")):
        read_queries(path)


@pytest.mark.parametrize("read, suffix", [
    (lambda p: list(read_documents(p)), ".jsonl"), (lambda p: list(read_documents(p)), ".txt"),
    (lambda p: list(read_documents(p)), ".parquet"), (read_corpus, ".jsonl"), (read_queries, ".jsonl"),
    (read_qrels, ".tsv"), (read_train, ".jsonl"), (read_run, ".trec"), (load_config_file, ".yaml"),
    (load_config_file, ".json"), (lambda p: PromptSpec.load(p.parent), CONFIG_NAME),
])
def test_unreadable_files_name_the_file(tmp_path, monkeypatch, read, suffix):
    path = tmp_path / (CONFIG_NAME if suffix == CONFIG_NAME else f"locked{suffix}")
    path.write_text("{}\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    for name in ("open", "read_bytes", "read_text"):
        monkeypatch.setattr(Path, name, denied)
    monkeypatch.setattr(pq, "ParquetFile", denied)
    with pytest.raises(Llama2VecError, match=re.escape(str(path)) + ": .*Permission denied"):
        read(path)


@pytest.mark.parametrize("read, suffix", [
    (lambda p: list(read_documents(p)), ".jsonl"), (lambda p: list(read_documents(p)), ".parquet"),
    (read_qrels, ".tsv"), (load_config_file, ".yaml"), (lambda p: PromptSpec.load(p.parent), ""),
])
def test_a_path_with_a_nul_byte_names_it(tmp_path, read, suffix):
    """A path can come from a YAML config value ("corpus: "a\\0b""): open() raises ValueError."""
    path = tmp_path / f"a\0b{suffix}" if suffix else tmp_path / "a\0b" / CONFIG_NAME
    with pytest.raises(Llama2VecError) as error:
        read(path)
    assert str(error.value).startswith(str(path))
