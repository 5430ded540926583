"""Stage 2: validating one CRM extract with Great Expectations Core."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from callconv.config import ValidationRules
from callconv.intake.validate import REASON_CODES, ExtractRejected, ValidationReport, validate_extract

OUTCOMES = {"sale", "lead"}
# Everything may fail in the row-level tests; the share limit has its own tests.
LENIENT = ValidationRules(max_bad_row_share=1.0)


def extract(rows: dict[int, dict[str, str | None]], columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """A frame indexed by source row; unspecified cells of a row get valid defaults."""
    defaults = {
        "caller_phone": "+4791234567",
        "conversion_time": "2024-03-05T14:22:00+01:00",
        "outcome": "sale",
        "value": "100.00",
        "currency": "NOK",
        "crm_id": None,
    }
    columns = columns or tuple(defaults)
    records = [{column: row.get(column, defaults[column]) for column in columns} for row in rows.values()]
    return pd.DataFrame(records, index=pd.Index(list(rows), dtype="int64"), columns=list(columns), dtype=object)


def clean_rows(count: int, start: int = 2) -> dict[int, dict[str, str | None]]:
    return {start + number: {"caller_phone": f"+47912{number:05d}", "crm_id": f"C{number}"} for number in range(count)}


# --- table-level checks ----------------------------------------------------------------------


def test_missing_required_column_is_rejected_naming_it():
    frame = extract({2: {}}, columns=("caller_phone", "outcome", "value"))

    with pytest.raises(ExtractRejected) as caught:
        validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert caught.value.kind == "missing_columns"
    assert str(caught.value) == (
        "required column(s) missing from the extract: conversion_time "
        "(required: caller_phone, conversion_time, outcome)"
    )


def test_every_missing_required_column_is_named():
    frame = extract({2: {}}, columns=("caller_phone", "crm_id"))

    with pytest.raises(ExtractRejected, match=r"missing from the extract: conversion_time, outcome \("):
        validate_extract(frame, OUTCOMES, ".", LENIENT)


def test_missing_columns_are_rejected_even_when_the_extract_is_empty():
    frame = extract({}, columns=("caller_phone", "conversion_time"))

    with pytest.raises(ExtractRejected) as caught:
        validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert caught.value.kind == "missing_columns"
    assert "missing from the extract: outcome (" in str(caught.value)


def test_optional_columns_may_be_absent():
    frame = extract({2: {}, 3: {"caller_phone": ""}}, columns=("caller_phone", "conversion_time", "outcome"))

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_count == 2
    assert report.row_reasons == {3: ["phone_missing"]}


def test_empty_extract_on_a_day_that_expects_data_is_a_warning():
    frame = extract({})

    report = validate_extract(frame, OUTCOMES, ".", ValidationRules(min_rows=5, expect_data=True))

    assert report.row_count == 0
    assert report.warnings == ["the extract is empty, but this day expects data"]
    assert report.row_reasons == {}
    assert report.reason_counts == {}
    assert report.bad_row_share == 0.0
    assert report.good_rows(frame).empty


def test_empty_extract_on_a_day_without_data_is_fine():
    report = validate_extract(extract({}), OUTCOMES, ".", ValidationRules(expect_data=False))

    assert report.row_count == 0
    assert report.warnings == []


def test_non_empty_extract_below_min_rows_is_rejected():
    frame = extract(clean_rows(3))

    with pytest.raises(ExtractRejected) as caught:
        validate_extract(frame, OUTCOMES, ".", ValidationRules(min_rows=4))

    assert caught.value.kind == "too_few_rows"
    assert str(caught.value) == "the extract has 3 rows, fewer than the minimum of 4"


def test_extract_above_max_rows_is_rejected():
    frame = extract(clean_rows(3))

    with pytest.raises(ExtractRejected) as caught:
        validate_extract(frame, OUTCOMES, ".", ValidationRules(max_rows=2))

    assert caught.value.kind == "too_many_rows"
    assert str(caught.value) == "the extract has 3 rows, more than the maximum of 2"


def test_row_count_on_the_bounds_is_accepted():
    frame = extract(clean_rows(3))

    report = validate_extract(frame, OUTCOMES, ".", ValidationRules(min_rows=3, max_rows=3))

    assert report.row_count == 3
    assert report.row_reasons == {}


# --- row-level checks ------------------------------------------------------------------------


def test_each_reason_is_reported_on_its_source_rows():
    frame = extract(
        {
            10: {},
            11: {"caller_phone": "   "},
            12: {"caller_phone": None},
            13: {"conversion_time": ""},
            14: {"conversion_time": "next tuesday"},
            15: {"conversion_time": "2024-02-30 10:00"},
            16: {"value": "12 apples"},
            17: {"value": "-3.50"},
            18: {"currency": "EURO"},
            19: {"outcome": "refund"},
            20: {"outcome": None},
            21: {"caller_phone": "", "outcome": "lost", "value": "-1"},
        }
    )

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_count == 12
    assert report.row_reasons == {
        11: ["phone_missing"],
        12: ["phone_missing"],
        13: ["time_missing"],
        14: ["time_unparseable"],
        15: ["time_unparseable"],
        16: ["value_unparseable"],
        17: ["value_negative"],
        18: ["currency_unknown"],
        19: ["outcome_unknown"],
        20: ["outcome_unknown"],
        21: ["phone_missing", "value_negative", "outcome_unknown"],
    }
    assert report.reason_counts == {
        "phone_missing": 3,
        "time_missing": 1,
        "time_unparseable": 2,
        "value_unparseable": 1,
        "value_negative": 2,
        "currency_unknown": 1,
        "outcome_unknown": 3,
    }
    assert report.bad_row_share == pytest.approx(11 / 12)
    assert report.warnings == []
    assert set(report.reason_counts) <= set(REASON_CODES)


def test_cells_the_warehouse_cannot_hold_are_row_reasons_and_the_docs_show_no_number(tmp_path):
    frame = extract(
        {
            2: {},
            3: {"crm_id": "C" * 129},  # the column holds 128
            4: {"crm_id": "C" * 128},
            5: {"caller_phone": "+47 912\x0034 567"},
            6: {"crm_id": "S-\x00", "currency": "NO\x00K"},
            7: {"conversion_time": "0001-01-01 00:30:00"},
            8: {"conversion_time": "9999-12-31 23:30:00-05:00"},
        }
    )
    docs = tmp_path / "docs"

    report = validate_extract(frame, OUTCOMES, ".", LENIENT, data_docs_dir=docs, run_name="acme_day")

    assert report.row_reasons == {
        3: ["crm_id_too_long"],
        5: ["nul_byte"],
        6: ["currency_unknown", "nul_byte"],
        7: ["time_out_of_range"],
        8: ["time_out_of_range"],
    }
    text = "\n".join(path.read_text(encoding="utf-8") for path in docs.rglob("*") if path.suffix in {".html", ".json"})
    assert "129 characters" in text and "C" * 129 not in text
    assert "+47 912" not in text and "34 567" not in text  # a NUL is reported by column name, never by value


def test_blank_optional_values_pass_and_values_are_trimmed():
    frame = extract(
        {
            2: {"value": "", "currency": "", "crm_id": ""},
            3: {"value": None, "currency": None, "crm_id": None},
            4: {"value": " 0 ", "currency": " nok ", "outcome": " lead "},
            5: {"currency": "eur"},
        }
    )

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_reasons == {}
    assert report.reason_counts == {}
    assert report.bad_row_share == 0.0


def test_times_with_and_without_offsets_are_readable_year_first():
    times = {
        2: "2024-03-05T14:22:00+01:00",
        3: "2024-03-05T13:22:00Z",
        4: "2024-03-05 14:22",
        5: "2024-03-05",
        6: "2024/03/05 14:22:10",
        7: "05.03.2024 14:22",  # day or month first? refused, as normalisation does
        8: "now",
        9: "2024-13-45 10:00",
        10: "2024-03-05 14:22 CET",
    }
    frame = extract({row: {"conversion_time": time} for row, time in times.items()})

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_reasons == {row: ["time_unparseable"] for row in (7, 8, 9, 10)}


def test_duplicate_crm_ids_flag_every_row_after_the_first():
    frame = extract(
        {
            2: {"crm_id": "A-1"},
            3: {"crm_id": "B-2"},
            4: {"crm_id": "A-1"},
            5: {"crm_id": " A-1 "},
            6: {"crm_id": ""},
            7: {"crm_id": ""},
            8: {"crm_id": None},
            9: {"crm_id": "b-2"},
            10: {"crm_id": "B-2"},
        }
    )

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_reasons == {4: ["duplicate_crm_id"], 5: ["duplicate_crm_id"], 10: ["duplicate_crm_id"]}
    assert report.reason_counts == {"duplicate_crm_id": 3}
    assert report.good_rows(frame).index.tolist() == [2, 3, 6, 7, 8, 9]


def test_decimal_comma_values():
    values = {
        2: "1.234,50",
        3: "12,5",
        4: "0,00",
        5: "1 234 567,89",
        6: "kr 99,90",
        7: "-0,01",
        8: "12.5",
        9: "1,234.50",
        10: "1.23,4",
    }
    frame = extract({row: {"value": value} for row, value in values.items()})

    report = validate_extract(frame, OUTCOMES, ",", LENIENT)

    assert report.row_reasons == {
        7: ["value_negative"],
        8: ["value_unparseable"],
        9: ["value_unparseable"],
        10: ["value_unparseable"],
    }


def test_decimal_point_values():
    values = {2: "1,234.50", 3: "12.5", 4: "1234", 5: "$ 5.00", 6: "12,5", 7: "1.234,50", 8: "-7"}
    frame = extract({row: {"value": value} for row, value in values.items()})

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_reasons == {6: ["value_unparseable"], 7: ["value_unparseable"], 8: ["value_negative"]}


def test_string_dtype_input_with_missing_values():
    frame = pd.DataFrame(
        {
            "caller_phone": pd.array(["+4791234567", pd.NA, "+4791234568"], dtype="string"),
            "conversion_time": pd.array(["2024-03-05 10:00", "2024-03-05 11:00", pd.NA], dtype="string"),
            "outcome": pd.array(["sale", "lead", "sale"], dtype="string"),
        },
        index=[5, 6, 7],
    )

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)

    assert report.row_reasons == {6: ["phone_missing"], 7: ["time_missing"]}


def test_index_must_be_unique_source_rows():
    frame = pd.concat([extract({2: {}}), extract({2: {}})])

    with pytest.raises(ValueError, match="index must be unique"):
        validate_extract(frame, OUTCOMES, ".", LENIENT)


# --- share of bad rows -----------------------------------------------------------------------


def test_bad_share_above_limit_rejects_with_counts_and_no_row_contents():
    rows = clean_rows(20)
    for row in (2, 3, 4, 5, 6):
        rows[row]["outcome"] = "refund"
    rows[7]["caller_phone"] = ""
    rows[8]["value"] = "-5"
    frame = extract(rows)

    with pytest.raises(ExtractRejected) as caught:
        validate_extract(frame, OUTCOMES, ".", ValidationRules(max_bad_row_share=0.2))

    rejected = caught.value
    assert rejected.kind == "too_many_bad_rows"
    assert str(rejected) == (
        "35.0% of rows failed validation (7 of 20), above the 20.0% limit; "
        "by reason: phone_missing=1, value_negative=1, outcome_unknown=5"
    )
    assert "refund" not in str(rejected) and "+47" not in str(rejected)
    assert rejected.report is not None
    assert rejected.report.row_reasons == {
        2: ["outcome_unknown"],
        3: ["outcome_unknown"],
        4: ["outcome_unknown"],
        5: ["outcome_unknown"],
        6: ["outcome_unknown"],
        7: ["phone_missing"],
        8: ["value_negative"],
    }


def test_bad_share_at_the_limit_is_accepted():
    rows = clean_rows(10)
    rows[2]["outcome"] = "refund"
    rows[3]["conversion_time"] = "soon"

    report = validate_extract(extract(rows), OUTCOMES, ".", ValidationRules(max_bad_row_share=0.2))

    assert report.bad_row_share == pytest.approx(0.2)
    assert report.reason_counts == {"time_unparseable": 1, "outcome_unknown": 1}


def test_good_rows_returns_the_rows_that_passed_unchanged():
    rows = clean_rows(5)
    rows[3]["outcome"] = "refund"
    rows[5]["value"] = "n/a"
    frame = extract(rows)
    frame["extra"] = ["a", "b", "c", "d", "e"]

    report = validate_extract(frame, OUTCOMES, ".", LENIENT)
    good = report.good_rows(frame)

    assert report.row_reasons == {3: ["outcome_unknown"], 5: ["value_unparseable"]}
    assert good.index.tolist() == [2, 4, 6]
    assert good["extra"].tolist() == ["a", "c", "e"]
    assert good["caller_phone"].tolist() == ["+4791200000", "+4791200002", "+4791200004"]
    pd.testing.assert_frame_equal(good, frame.loc[[2, 4, 6]])


def test_good_rows_of_a_hand_made_report():
    report = ValidationReport(
        row_count=3,
        row_reasons={1: ["phone_missing"]},
        reason_counts={"phone_missing": 1},
        bad_row_share=1 / 3,
        warnings=[],
        data_docs_path=None,
    )
    frame = pd.DataFrame({"x": ["a", "b", "c"]}, index=[0, 1, 2])

    assert report.good_rows(frame)["x"].tolist() == ["a", "c"]


# --- Data Docs, logs, quietness --------------------------------------------------------------


def _phone_rows() -> dict[int, dict[str, str | None]]:
    return {
        2: {"caller_phone": "+47 912 34 567", "crm_id": "A"},
        3: {"caller_phone": "004798765432", "crm_id": "A", "outcome": "refund"},
        4: {"caller_phone": "98 76 54 31", "conversion_time": "whenever"},
        5: {"caller_phone": "", "value": "-1"},
    }


def test_data_docs_are_written_and_hold_no_phone_number(tmp_path):
    docs = tmp_path / "docs"

    report = validate_extract(extract(_phone_rows()), OUTCOMES, ".", LENIENT, data_docs_dir=docs, run_name="acme_day")

    assert report.data_docs_path == str(docs / "index.html")
    index = (docs / "index.html").read_text(encoding="utf-8")
    assert "callconv_extract_rows" in index and "callconv_extract_table" in index
    pages = sorted(path.relative_to(docs).as_posix() for path in docs.rglob("*.html"))
    assert len([page for page in pages if page.startswith("validations/callconv_extract_rows/acme_day/")]) == 1
    text = "\n".join(path.read_text(encoding="utf-8") for path in docs.rglob("*") if path.suffix in {".html", ".json"})
    for phone in ("+47 912 34 567", "004798765432", "98 76 54 31", "91234567", "98765432", "98765431"):
        assert phone not in text
    # The checks themselves are in the docs, with the failing values that are not personal.
    assert "phone_missing" in text and "whenever" in text and "refund" in text
    assert report.row_reasons == {
        3: ["outcome_unknown", "duplicate_crm_id"],
        4: ["time_unparseable"],
        5: ["phone_missing", "value_negative"],
    }


def test_rejected_extract_still_gets_data_docs(tmp_path):
    docs = tmp_path / "docs"
    frame = extract({2: {}}, columns=("caller_phone", "outcome"))

    with pytest.raises(ExtractRejected) as caught:
        validate_extract(frame, OUTCOMES, ".", LENIENT, data_docs_dir=docs)

    assert caught.value.data_docs_path == str(docs / "index.html")
    assert "callconv_extract_table" in (docs / "index.html").read_text(encoding="utf-8")
    assert "+4791234567" not in "\n".join(path.read_text(encoding="utf-8") for path in docs.rglob("*.html"))


def test_without_data_docs_dir_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    report = validate_extract(extract({2: {}}), OUTCOMES, ".", LENIENT)

    assert report.data_docs_path is None
    assert list(tmp_path.iterdir()) == []


def test_logs_hold_counts_but_no_row_values_and_nothing_is_printed(caplog, capsys):
    caplog.set_level(logging.DEBUG)

    validate_extract(extract(_phone_rows()), OUTCOMES, ".", LENIENT)

    messages = [record.getMessage() for record in caplog.records if record.name.startswith("callconv")]
    assert messages == [
        "validated 4 rows: 3 failed (75.0%); by reason: phone_missing=1, time_unparseable=1, "
        "value_negative=1, outcome_unknown=1, duplicate_crm_id=1"
    ]
    everything = caplog.text
    for value in ("912 34 567", "98765432", "98 76 54 31", "refund", "whenever"):
        assert value not in everything
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Calculating Metrics" not in captured.err


def test_unknown_decimal_separator_is_a_programming_error():
    with pytest.raises(ValueError, match="decimal separator must be"):
        validate_extract(extract({2: {}}), OUTCOMES, ";", LENIENT)


# --- identical copies of a row: dropped before validation, never a bad row ------------------


def test_identical_copies_are_dropped_and_counted_the_first_copy_kept():
    from callconv.intake.validate_prepare import IdenticalRows

    frame = extract(
        {
            2: {"crm_id": "A-1"},
            3: {"crm_id": "A-1"},  # the same row again
            4: {"crm_id": " A-1 ", "currency": "NOK "},  # the same once trimmed
            5: {"crm_id": "A-1", "value": "200.00"},  # the same id, other content
            6: {"crm_id": None},
            7: {"crm_id": ""},  # blank is missing: the same as row 6
            8: {"crm_id": "None"},  # a value, not a missing cell
        }
    )
    identical = IdenticalRows()

    kept = identical.first_copies(frame)

    assert kept.index.tolist() == [2, 5, 6, 8]
    assert identical.dropped == 3
    # What is left for validation: the other content under the same id is still a duplicate id.
    report = validate_extract(kept, OUTCOMES, ".", LENIENT)
    assert report.row_reasons == {5: ["duplicate_crm_id"]}


def test_identical_copies_are_found_across_chunks_as_in_a_whole_file():
    from callconv.intake.validate_prepare import IdenticalRows

    rows = {number: {"crm_id": f"C{number % 7}", "caller_phone": f"+4791{number % 7:06d}"} for number in range(2, 22)}
    frame = extract(rows)
    whole = IdenticalRows()
    kept_whole = whole.first_copies(frame).index.tolist()

    chunked = IdenticalRows()
    kept_chunked = []
    for start in range(0, len(frame), 3):
        kept_chunked += chunked.first_copies(frame.iloc[start : start + 3]).index.tolist()

    assert kept_whole == kept_chunked == list(range(2, 9))
    assert whole.dropped == chunked.dropped == 13
    assert IdenticalRows().first_copies(frame.iloc[:0]).empty
