"""The dataset registry: real files, official-schema fixtures, and errors naming the spot."""

import json
from collections import Counter

import pytest
from conftest import SHARED_DATA

from peftdebias_jax.data import tasks
from peftdebias_jax.data.records import DataError


@pytest.mark.parametrize(
    ("task", "path", "count", "labels"),
    [
        ("bias_bios", "bias_in_bios/accountant_complete.csv", 1000, {"accountant": 1000}),
        ("ghc", "ghc/ghc_train.tsv", 22036, {"0": 20095, "1": 1941}),
        ("stormfront", "stormfront/stormfront_train.tsv", 1914, {"0": 957, "1": 957}),
        ("iptts", "iptts/bias_madlibs_77k.csv", 76564, {"0": 38282, "1": 38282}),
        ("mnli", "mnli/mnli_dev_matched_hard.tsv", 4573,
         {"entailment": 1701, "neutral": 1486, "contradiction": 1386}),
    ],
)  # fmt: skip
def test_real_files(task, path, count, labels):
    examples = tasks.load_split(tasks.get(task), SHARED_DATA / path)
    assert len(examples) == count
    assert Counter(e.label for e in examples) == labels


def test_bias_bios_samples_cover_28_professions_with_gender():
    examples = []
    for path in sorted((SHARED_DATA / "bias_in_bios/samples").glob("*.csv")):
        examples += tasks.load_split(tasks.get("bias_bios"), path)
    assert {e.label for e in examples} == set(tasks.PROFESSIONS)
    assert {e.group for e in examples} == {"m", "f"}


def test_mnli_pairs_and_bias_nli_probes():
    mnli = tasks.load_split(tasks.get("mnli"), SHARED_DATA / "mnli/mnli_dev_matched_hard.tsv")
    assert mnli[0].text_pair and mnli[0].text != mnli[0].text_pair
    occupations = tasks.read_word_file(SHARED_DATA / "bias_nli/occupations")
    words = tasks.read_word_file(SHARED_DATA / "bias_nli/gendered_words")
    probes = tasks.bias_nli_probes(occupations, words)
    assert len(probes) == 164 * 6 * 5
    assert probes[0].text == "The accountant ate a bagel."
    assert probes[0].text_pair == "The man ate a bagel." and probes[0].label == "neutral"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_official_schema_fixtures(tmp_path):
    bios = write_jsonl(tmp_path / "bios.jsonl", [
        {"text": "She is a nurse.", "p": "nurse", "g": "f"},
        {"text": "He codes.", "p": "software_engineer", "g": "m"},
    ])  # fmt: skip
    assert [(e.label, e.group) for e in tasks.load_split(tasks.get("bias_bios"), bios)] == [
        ("nurse", "f"),
        ("software_engineer", "m"),
    ]
    hub = tmp_path / "hub.csv"
    hub.write_text("hard_text,profession,gender\nShe paints.,14,1\nHe teaches.,26,0\n")
    assert [(e.label, e.group) for e in tasks.load_split(tasks.get("bias_bios"), hub)] == [
        ("painter", "f"),
        ("teacher", "m"),
    ]
    ghc = write_jsonl(
        tmp_path / "ghc.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    )
    assert [e.label for e in tasks.load_split(tasks.get("ghc"), ghc)] == ["1", "0"]
    released = tmp_path / "ghc.tsv"
    released.write_text("text\thd\tcv\tvo\na\t0\t1\t0\nb\t0\t0\t1\nc\t1\t0\t0\n")
    assert [e.label for e in tasks.load_split(tasks.get("ghc"), released)] == ["1", "0", "1"]
    lhc = write_jsonl(
        tmp_path / "lhc.jsonl", [{"text": "a", "label": "hate"}, {"text": "b", "label": "normal"}]
    )
    assert [e.label for e in tasks.load_split(tasks.get("lhc"), lhc)] == ["1", "0"]
    fdcl = tmp_path / "fdcl.csv"
    fdcl.write_text("id,text,t,ND_label\n1,yo,aav,1\n2,hi,white,0\n")
    examples = tasks.load_split(tasks.get("fdcl"), fdcl)
    assert [(e.label, e.group) for e in examples] == [("1", "aav"), ("0", "white")]
    assert tasks.label_set(tasks.get("fdcl"), examples) == ("0", "1")
    parquet = tmp_path / "mnli.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"premise": ["p"], "hypothesis": ["h"], "label": [2]}), parquet)
    assert tasks.load_split(tasks.get("mnli"), parquet)[0].label == "contradiction"


def test_missing_column_names_the_file_and_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "profession": "nurse"}])
    with pytest.raises(DataError, match=r"x\.jsonl: the columns \['text', 'profession'\]"):
        tasks.load_split(tasks.get("bias_bios"), path)


def test_label_outside_the_set_names_line_and_label(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"text": "a", "p": "nurse", "g": "f"},
        {"text": "b", "p": "astronaut", "g": "m"},
    ])  # fmt: skip
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: label 'astronaut'"):
        tasks.load_split(tasks.get("bias_bios"), path)
    bad_gender = write_jsonl(tmp_path / "y.jsonl", [{"text": "a", "p": "nurse", "g": "x"}])
    with pytest.raises(DataError, match=r"y\.jsonl, line 1: value 'x'"):
        tasks.load_split(tasks.get("bias_bios"), bad_gender)


def test_malformed_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: not valid JSON"):
        tasks.load_split(tasks.get("ghc"), path)
    tsv = tmp_path / "x.tsv"
    tsv.write_text("text\tlabel\nfine\thate\nbroken line without tab\n")
    with pytest.raises(DataError, match=r"x\.tsv, line 3: expected 2 fields"):
        tasks.load_split(tasks.get("stormfront"), tsv)
    hd = tmp_path / "g.tsv"
    hd.write_text("text\thd\tcv\na\tmaybe\t0\n")
    with pytest.raises(DataError, match=r"g\.tsv, line 2: value 'maybe' is not 0/1"):
        tasks.load_split(tasks.get("ghc"), hd)


def test_empty_split_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        tasks.load_split(tasks.get("ghc"), tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="data file not found"):
        tasks.load_split(tasks.get("ghc"), tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown task 'imdb'"):
        tasks.get("imdb")


def test_blank_text_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "  ", "label": 0}])
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: field 'text' has no text"):
        tasks.load_split(tasks.get("ghc"), path)
