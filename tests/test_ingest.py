"""Reading vocabulary files: fatal input errors, per-row problems, formats, streaming, real data."""

from __future__ import annotations

import csv
import unicodedata
from pathlib import Path

import pytest

from flashcard_pipeline.errors import ConfigurationError, InputError
from flashcard_pipeline.ingest import RowProblem, VocabularyReader, read_vocabulary
from flashcard_pipeline.models import VocabularyItem

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(tmp_path: Path, name: str, content: str | bytes, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


def terms(items: list[VocabularyItem]) -> list[str]:
    return [item.term for item in items]


def assert_one_line_error(exc: pytest.ExceptionInfo[InputError], path: Path, fragment: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert fragment in message


# -- fatal input errors -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.csv"
    with pytest.raises(InputError) as exc:
        read_vocabulary(path)
    assert_one_line_error(exc, path, "file not found")
    assert exc.value.code == "file_not_found"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        read_vocabulary(tmp_path)
    assert_one_line_error(exc, tmp_path, "is a directory")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", b"")
    with pytest.raises(InputError) as exc:
        VocabularyReader(path).detect()
    assert_one_line_error(exc, path, "file is empty")


def test_binary_file_with_nul_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.bin", b"PK\x03\x04\x00\x00binary")
    with pytest.raises(InputError) as exc:
        read_vocabulary(path)
    assert_one_line_error(exc, path, "not a text file (NUL byte at byte 5)")


def test_invalid_utf8_at_start_is_not_a_text_file(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.bin", b"ab\xff\xfecd\n")
    with pytest.raises(InputError) as exc:
        read_vocabulary(path)
    assert_one_line_error(exc, path, "not a text file (invalid UTF-8 at byte 3, line 1)")


def test_utf16_file_is_refused_with_advice(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.txt", "term\n내가\n", encoding="utf-16")
    with pytest.raises(InputError) as exc:
        read_vocabulary(path)
    assert_one_line_error(exc, path, "UTF-16")


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_invalid_utf8_late_in_file_names_the_line(tmp_path: Path, newline: str) -> None:
    end = newline.encode()
    rows = [f"{n},term{n},noun".encode() + end for n in range(1, 5001)]
    rows[3999] = b"4000,bad\xc3(,noun" + end
    header = b"position,term,type" + end
    path = write(tmp_path, "vocab.csv", header + b"".join(rows))
    bad_byte = len(header) + sum(map(len, rows[:3999])) + len(b"4000,bad") + 1
    reader = VocabularyReader(path)
    seen: list[VocabularyItem] = []
    with pytest.raises(InputError) as exc:
        for item in reader:
            seen.append(item)
    assert_one_line_error(exc, path, f"invalid UTF-8 on line 4001 (byte {bad_byte})")
    assert 0 < len(seen) < 3999  # raised mid-stream, after the rows before it came through
    assert terms(seen) == [f"term{n}" for n in range(1, len(seen) + 1)]


@pytest.mark.parametrize(
    ("content", "name"),
    [
        ("position,term,type\n", "vocab.csv"),
        ("position,term,type\r\n\r\n\r\n", "vocab.csv"),
        ("\n\n   \n", "vocab.txt"),
        ("# my words\n\n# nothing yet\n", "vocab.txt"),
        ("\ufeff", "vocab.csv"),
    ],
)
def test_no_vocabulary_rows(tmp_path: Path, content: str, name: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(InputError) as exc:
        VocabularyReader(path).detect()
    assert_one_line_error(exc, path, "no vocabulary rows")
    with pytest.raises(InputError, match="no vocabulary rows"):
        read_vocabulary(path)


def test_no_term_column_lists_found_and_expected_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "a,b,c\n1,2,3\n")
    reader = VocabularyReader(path)
    with pytest.raises(InputError) as exc:
        iter(reader)  # eager: fails before the first item is even requested
    assert_one_line_error(exc, path, "no term column (found columns: a, b, c; expected one of: term, hangul")
    assert exc.value.code == "no_term_column"


def test_bad_encoding_arguments_are_configuration_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.txt", "내가\n")
    with pytest.raises(ConfigurationError):
        VocabularyReader(path, encoding="no-such-codec")
    with pytest.raises(ConfigurationError):
        VocabularyReader(path, encoding="utf-16")


# -- per-row problems ---------------------------------------------------------------------------


def test_bad_rows_are_reported_and_skipped(tmp_path: Path) -> None:
    long_term = "가" * 201
    decomposed = unicodedata.normalize("NFD", "한국")
    lines = [
        "position,term,type",  # 1
        "1,Apple,noun",  # 2
        "2,,noun",  # 3 empty term
        "x,사과,noun",  # 4 bad position
        "-3,배,noun",  # 5 not positive
        "1,바나나,noun",  # 6 duplicate position
        f"7,{long_term},noun",  # 7 too long
        '8,"tab\there",noun',  # 8 control character
        "9,a,b,c",  # 9 unquoted delimiter
        "10,APPLE,noun",  # 10 duplicate term (casefold)
        "11,한국,noun",  # 11
        f"12,{decomposed},noun",  # 12 duplicate after NFC
        "13,  포도  ,noun",  # 13
    ]
    path = write(tmp_path, "vocab.csv", "\n".join(lines) + "\n")
    items, problems = read_vocabulary(path)

    assert terms(items) == ["Apple", "한국", "포도"]
    assert [item.source_row for item in items] == [2, 11, 13]
    assert [item.position for item in items] == [1, 11, 13]
    assert [(p.row, p.reason) for p in problems] == [
        (3, "empty term"),
        (4, "position 'x' is not a positive integer"),
        (5, "position '-3' is not a positive integer"),
        (6, "duplicate position 1 (first used on row 2)"),
        (7, "term is longer than 200 characters (201)"),
        (8, "term contains a control character (U+0009)"),
        (9, "row has 4 fields, header has 3"),
        (10, "duplicate of row 2 (APPLE)"),
        (12, "duplicate of row 11 (한국)"),
    ]
    assert problems[1].term == "사과"
    assert problems[0].term is None
    assert str(problems[0]) == "row 3: empty term"


def test_term_of_exactly_200_characters_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", f"term\n{'가' * 200}\n")
    items, problems = read_vocabulary(path)
    assert len(items[0].term) == 200
    assert problems == []


def test_trailing_empty_fields_are_not_extra_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "position,term,type\n1,내가,pronoun,,\n2,그,pronoun, \n")
    items, problems = read_vocabulary(path)
    assert terms(items) == ["내가", "그"]
    assert problems == []


def test_unterminated_quote_is_reported_not_swallowed_into_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", 'term,note\n내가,ok\n그,"oops\n나,y\n너,z\n')
    items, problems = read_vocabulary(path)
    assert terms(items) == ["내가"]
    assert [(p.row, p.reason) for p in problems] == [
        (3, "unterminated quote (record runs from line 3 to the end of the file)")
    ]


def test_stray_quote_spanning_lines_names_the_span(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", 'term,note\n1,"oops\n그,x",z\n나,ok\n')
    items, problems = read_vocabulary(path)
    assert terms(items) == ["나"]
    assert [(p.row, p.reason) for p in problems] == [
        (2, "row has 3 fields, header has 2 (record spans lines 2-3: unbalanced quote?)")
    ]


def test_unparsable_record_is_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    huge = "x" * (csv.field_size_limit() + 10)
    path = write(tmp_path, "vocab.csv", f'term,note\n내가,a\n그,"{huge}"\n나,b\n')
    items, problems = read_vocabulary(path)
    assert terms(items) == ["내가", "나"]
    assert [p.row for p in problems] == [3]
    assert problems[0].reason.startswith("cannot parse CSV (field larger than field limit")


def test_good_rows_after_a_bad_row_keep_their_record_position(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "term,type\n내가,pronoun\n,noun\n그,pronoun\n")
    items, problems = read_vocabulary(path)
    assert [(i.term, i.position, i.source_row) for i in items] == [("내가", 1, 2), ("그", 3, 4)]
    assert [p.row for p in problems] == [3]


# -- formats and encodings ----------------------------------------------------------------------


def test_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", b"\xef\xbb\xbfPosition,Term,Type\r\n1,\xeb\x82\xb4\xea\xb0\x80,pronoun\r\n")
    reader = VocabularyReader(path)
    items = list(reader)
    assert reader.detect().columns == ("Position", "Term", "Type")
    assert items == [VocabularyItem(position=1, term="내가", type="pronoun", source_row=2)]


def test_lone_cr_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "term,type\r내가,pronoun\r그,pronoun\r")
    items, problems = read_vocabulary(path)
    assert [(i.term, i.source_row) for i in items] == [("내가", 2), ("그", 3)]
    assert problems == []


def test_quoted_field_with_newline_delimiter_and_quote(tmp_path: Path) -> None:
    content = (
        'position,term,Definition\n1,내가,"I, the speaker\nsecond line with ""quotes"""\n2,그,that\n3,"나, 너",phrase\n'
    )
    path = write(tmp_path, "vocab.csv", content)
    items, problems = read_vocabulary(path)
    assert problems == []
    assert [(i.term, i.source_row) for i in items] == [("내가", 2), ("그", 4), ("나, 너", 5)]
    assert items[0].hints["Definition"] == 'I, the speaker\nsecond line with "quotes"'


@pytest.mark.parametrize(
    ("delimiter", "name", "expected_format"),
    [
        (",", "vocab.csv", "csv"),
        ("\t", "vocab.tsv", "tsv"),
        (";", "vocab.csv", "csv"),
        ("|", "vocab.dat", "csv"),
        ("\t", "vocab.txt", "tsv"),
    ],
)
def test_delimiter_detection(tmp_path: Path, delimiter: str, name: str, expected_format: str) -> None:
    rows = [["position", "term", "type", "Definition"], ["1", "내가", "pronoun", "I"], ["2", "그", "pronoun", "that"]]
    path = write(tmp_path, name, "\n".join(delimiter.join(row) for row in rows) + "\n")
    reader = VocabularyReader(path)
    layout = reader.detect()
    assert (reader.format, layout.delimiter) == (expected_format, delimiter)
    items = list(reader)
    assert [(i.position, i.term, i.type, i.hints) for i in items] == [
        (1, "내가", "pronoun", {"Definition": "I"}),
        (2, "그", "pronoun", {"Definition": "that"}),
    ]


def test_punctuation_inside_values_does_not_fool_detection(tmp_path: Path) -> None:
    rows = "".join(f"단어{n},a; b; c; d|e\n" for n in range(30))
    path = write(tmp_path, "vocab.csv", "term,meaning\n" + rows)
    reader = VocabularyReader(path)
    items = list(reader)
    assert reader.detect().delimiter == ","
    assert len(items) == 30
    assert items[0].hints == {"meaning": "a; b; c; d|e"}


def test_plain_text_with_comments_and_blank_lines(tmp_path: Path) -> None:
    content = "# week 1, lesson 2\n내가\n\n  그  \n# more\n나\n"
    for name in ("words.txt", "words"):
        path = write(tmp_path, name, content)
        reader = VocabularyReader(path)
        items = list(reader)
        assert reader.format == "text"
        assert [(i.position, i.term, i.source_row) for i in items] == [(1, "내가", 2), (2, "그", 4), (3, "나", 6)]


@pytest.mark.parametrize("header", ["term", "Hangul", "\ufeffWORD"])
def test_a_text_lists_header_line_is_not_a_word(tmp_path: Path, header: str) -> None:
    path = write(tmp_path, "words.txt", f"# from class\n{header}\n내가\n그\n")
    reader = VocabularyReader(path)
    assert [(i.position, i.term) for i in reader] == [(1, "내가"), (2, "그")] and reader.problems == []
    assert terms(list(VocabularyReader(write(tmp_path, "more.txt", "내가\nterm\n")))) == ["내가", "term"], \
        "only a first line is a header"


def test_single_column_without_header_is_text_even_with_csv_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "words.csv", "내가\n그\n")
    reader = VocabularyReader(path)
    assert terms(list(reader)) == ["내가", "그"]
    assert reader.format == "text"


def test_single_column_csv_with_term_header(tmp_path: Path) -> None:
    path = write(tmp_path, "words.csv", "Term\n내가\n그\n")
    reader = VocabularyReader(path)
    assert terms(list(reader)) == ["내가", "그"]
    assert reader.format == "csv"


def test_delimited_file_without_header_needs_a_term_column(tmp_path: Path) -> None:
    path = write(tmp_path, "words.csv", "1,내가\n2,그\n")
    with pytest.raises(InputError, match=r"no term column \(found columns: 1, 내가;"):
        read_vocabulary(path)


def test_other_encoding(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "term,type\n내가,pronoun\n", encoding="cp949")
    with pytest.raises(InputError, match="not a text file"):
        read_vocabulary(path)
    items, _ = read_vocabulary(path, encoding="cp949")
    assert terms(items) == ["내가"]


# -- headers, hints, positions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "roles"),
    [
        ("POSITION,HANGUL,WORD TYPE", ("POSITION", "HANGUL", "WORD TYPE")),
        ("#,Word,pos", ("#", "Word", "pos")),
        ("Rank,Lemma,Part-Of-Speech", ("Rank", "Lemma", "Part-Of-Speech")),
        ("no,Korean,Word_Class", ("no", "Korean", "Word_Class")),
        ("pos_no,Head Word,TYPE", ("pos_no", "Head Word", "TYPE")),
    ],
)
def test_header_aliases_match_loosely(tmp_path: Path, header: str, roles: tuple[str, str, str]) -> None:
    path = write(tmp_path, "vocab.csv", f"{header}\n5,내가,pronoun\n")
    reader = VocabularyReader(path)
    layout = reader.detect()
    assert (layout.position_column, layout.term_column, layout.type_column) == roles
    assert [(i.position, i.term, i.type) for i in reader] == [(5, "내가", "pronoun")]


def test_hints_kept_bookkeeping_dropped_and_values_truncated(tmp_path: Path) -> None:
    header = "term,Definition,Usage_Hint,quality score,PROCESSED,Total-Tokens,Frequency,Frequency_Number,Note"
    row = f"내가,I,{'x' * 30},0.9,True,1677,1,39801,"
    path = write(tmp_path, "vocab.csv", f"{header}\n{row}\n")
    reader = VocabularyReader(path, max_hint_chars=10)
    items = list(reader)
    assert items[0].hints == {"Definition": "I", "Usage_Hint": "x" * 9 + "…"}
    assert reader.detect().dropped_columns == ("quality score", "PROCESSED", "Total-Tokens", "Frequency",
                                               "Frequency_Number")


def test_overlong_type_becomes_a_hint(tmp_path: Path) -> None:
    note = "pronoun, used mostly in spoken Korean among friends"
    path = write(tmp_path, "vocab.csv", f'term,type\n내가,"{note}"\n그,pronoun\n')
    items, problems = read_vocabulary(path)
    assert problems == []
    assert (items[0].type, items[0].hints) == (None, {"type": note})
    assert items[1].type == "pronoun"


def test_positions_default_to_record_order_and_explicit_ones_win(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", 'position,term\n10,내가\n,그\n"12.0",나\n\n,,\n,너\n')
    items, problems = read_vocabulary(path)
    assert [(i.term, i.position, i.source_row) for i in items] == [
        ("내가", 10, 2),
        ("그", 2, 3),
        ("나", 12, 4),
        ("너", 4, 7),
    ]
    assert problems == []


def test_default_position_colliding_with_an_explicit_one_is_a_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "position,term\n2,내가\n,그\n")
    items, problems = read_vocabulary(path)
    assert terms(items) == ["내가"]
    assert [(p.row, p.reason) for p in problems] == [(3, "duplicate position 2 (first used on row 2)")]


def test_reiteration_reopens_and_resets_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "vocab.csv", "term\n내가\n\u0007bell\n그\n")
    reader = VocabularyReader(path)
    first = list(reader)
    first_problems = reader.problems
    second = list(reader)
    assert first == second and terms(first) == ["내가", "그"]
    assert (
        first_problems == reader.problems == [RowProblem(3, "term contains a control character (U+0007)", "\u0007bell")]
    )
    path.write_text("term\n나\n", encoding="utf-8")
    assert terms(list(reader)) == ["나"]
    assert reader.problems == []


def test_streaming_yields_before_reading_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("position,term,type\n")
        handle.writelines(f"{n},단어{n},noun\n" for n in range(1, 100_001))
        handle.write("100001,단어1,noun\n5,새 단어,noun\n100002,단어99999,noun\n")  # lines 100002-100004
    size = path.stat().st_size
    reader = VocabularyReader(path)
    items = iter(reader)
    first = next(items)
    assert (first.position, first.term, first.source_row) == (1, "단어1", 2)
    assert 0 < reader.bytes_read < 64 * 1024 < size
    count = 1 + sum(1 for _ in items)
    assert count == 100_000
    assert reader.bytes_read == size
    # Duplicates are still recognised after the seen-sets have grown many times.
    assert [(p.row, p.reason) for p in reader.problems] == [
        (100_002, "duplicate of row 2 (단어1)"),
        (100_003, "duplicate position 5 (first used on row 6)"),
        (100_004, "duplicate of row 100000 (단어99999)"),
    ]


# -- real data ----------------------------------------------------------------------------------


def real_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real test data not available at {path}")
    return path


@pytest.mark.parametrize(
    ("name", "count", "rich"),
    [
        ("korean_1000_terms.csv", 1000, False),
        ("korean_10k.csv", 10000, True),
        ("korean_5_rich.csv", 5, True),
    ],
)
def test_real_files_parse_completely(name: str, count: int, rich: bool) -> None:
    path = real_file(name)
    items, problems = read_vocabulary(path)
    assert problems == []
    assert len(items) == count
    assert [i.position for i in items] == list(range(1, count + 1))
    first = items[0]
    assert (first.term, first.type, first.source_row) == ("내가", "pronoun", 2)
    if rich:
        assert first.hints["Definition"] == "I"
        assert "IPA_Pronunciation" in first.hints and "Example_Sentence_Translation" in first.hints
        assert not {"Processed", "Total_Tokens", "O4_Error", "Verified"} & first.hints.keys()
        with path.open(encoding="utf-8", newline="") as handle:
            blank = sum(1 for row in csv.DictReader(handle) if not row["Definition"].strip())
        assert sum("Definition" not in item.hints for item in items) == blank
    else:
        assert first.hints == {}


def test_thousand_term_list_is_a_prefix_of_the_10k_list() -> None:
    small, _ = read_vocabulary(real_file("korean_1000_terms.csv"))
    large, _ = read_vocabulary(real_file("korean_10k.csv"))
    assert terms(small) == terms(large)[:1000]
