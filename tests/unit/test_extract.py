"""Stage 1: finding the day's CRM files and reading them as text, from real files on disk."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
from datetime import date

import pytest

from callconv.config import CrmColumns, CrmSource
from callconv.intake.extract import ExtractError, day_folder, landing_files, read_crm_file

DAY = date(2026, 3, 2)

COLUMNS = CrmColumns(
    caller_phone="Telefon",
    conversion_time="Salgstidspunkt",
    outcome="Utfall",
    value="Beløp",
    currency="Valuta",
    crm_id="Sak",
    call_start="Samtalestart",
)


def source(**overrides) -> CrmSource:
    settings = {"delimiter": ";", "decimal": ",", "encoding": "utf-8-sig", "columns": COLUMNS}
    settings.update(overrides)
    return CrmSource(**settings)


def csv_text(rows: list[list[str]], delimiter: str = ";") -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    return out.getvalue()


HEADER = ["Sak", "Telefon", "Salgstidspunkt", "Utfall", "Beløp", "Valuta", "Kommentar"]
ROWS = [
    ["S-1", "+47 912 34 567", "2026-03-02 10:15:00", "sale", "1 234,50", "NOK", "first"],
    ["S-2", "004791234567", "2026-03-02 11:00", "upsell", "99,9", "", "second"],
    ["S-3", "22 12 34 56", "2026-03-02 12:30:00", "sale", "", "EUR", ""],
]


# --- reading ----------------------------------------------------------------------


def test_utf8_bom_semicolon_file_with_decimal_comma(tmp_path):
    path = tmp_path / "extract.csv"
    payload = csv_text([HEADER, *ROWS]).encode("utf-8-sig")
    assert payload.startswith(b"\xef\xbb\xbf")
    path.write_bytes(payload)

    extract = read_crm_file(path, source())

    frame = extract.frame
    # The BOM does not stick to the first header ('Sak'), so crm_id maps; 'Kommentar' is not ours.
    assert list(frame.columns) == ["caller_phone", "conversion_time", "outcome", "value", "currency", "crm_id"]
    assert list(frame.index) == [1, 2, 3]
    assert frame.loc[1].to_dict() == {
        "caller_phone": "+47 912 34 567",
        "conversion_time": "2026-03-02 10:15:00",
        "outcome": "sale",
        "value": "1 234,50",  # text: the decimal comma is for stage 3, not read as a number here
        "currency": "NOK",
        "crm_id": "S-1",
    }
    assert frame.loc[2, "caller_phone"] == "004791234567"  # leading zeros kept: every cell is text
    assert frame.loc[2, "value"] == "99,9"
    assert math.isnan(frame.loc[2, "currency"])  # blank cell is missing, not ""
    assert math.isnan(frame.loc[3, "value"])
    assert extract.source_uri == str(path)
    assert extract.checksum == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize(
    ("encoding", "bom"), [("utf-8-sig", False), ("utf-8-sig", True), ("utf-8", False), ("utf-8", True)]
)
def test_utf8_with_or_without_bom_maps_the_first_column(tmp_path, encoding, bom):
    path = tmp_path / "extract.csv"
    payload = csv_text([HEADER, *ROWS]).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + payload)
    frame = read_crm_file(path, source(encoding=encoding)).frame
    assert frame["crm_id"].tolist() == ["S-1", "S-2", "S-3"]
    assert frame.loc[1, "value"] == "1 234,50"


def test_latin1_file_keeps_its_letters(tmp_path):
    path = tmp_path / "latin.csv"
    rows = [
        ["Telefon", "Salgstidspunkt", "Utfall", "Beløp", "Kunde"],
        ["912 34 567", "2026-03-02 10:15", "sale", "1.234,50", "Bjørn Ødegård"],
        ["22 12 34 56", "2026-03-02 10:16", "tilbud på rør", "12,00", "Åse"],
    ]
    payload = csv_text(rows).encode("latin-1")
    assert "ø".encode("latin-1") in payload and not payload.startswith(b"\xef\xbb\xbf")
    path.write_bytes(payload)

    frame = read_crm_file(path, source(encoding="latin-1")).frame

    assert list(frame.columns) == ["caller_phone", "conversion_time", "outcome", "value"]
    assert frame["value"].tolist() == ["1.234,50", "12,00"]  # found through the header 'Beløp'
    assert frame.loc[2, "outcome"] == "tilbud på rør"


def test_latin1_file_read_as_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin.csv"
    rows = [["Telefon", "Salgstidspunkt", "Utfall", "Beløp"], ["1", "2", "3", "4"]]
    path.write_bytes(csv_text(rows).encode("latin-1"))
    with pytest.raises(ExtractError) as caught:
        read_crm_file(path, source(encoding="utf-8-sig"))
    assert str(caught.value) == "latin.csv: not readable as utf-8-sig; set crm_source.encoding"


def test_gzip_file_is_read_and_checksummed_as_stored(tmp_path):
    path = tmp_path / "extract.csv.gz"
    plain = csv_text([HEADER, *ROWS]).encode("utf-8")
    payload = gzip.compress(plain, mtime=0)
    path.write_bytes(payload)

    extract = read_crm_file(path, source())

    assert extract.frame["crm_id"].tolist() == ["S-1", "S-2", "S-3"]
    assert extract.frame["caller_phone"].tolist() == ["+47 912 34 567", "004791234567", "22 12 34 56"]
    assert extract.checksum == hashlib.sha256(payload).hexdigest()  # the file's bytes, not the unzipped ones
    assert extract.checksum != hashlib.sha256(plain).hexdigest()


def test_not_a_gzip_file(tmp_path):
    path = tmp_path / "extract.csv.gz"
    path.write_bytes(b"Telefon;Salgstidspunkt;Utfall\n")
    with pytest.raises(ExtractError, match=r"^extract\.csv\.gz: not a valid gzip file"):
        read_crm_file(path, source())


def test_truncated_gzip_file(tmp_path):
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(gzip.compress(csv_text([HEADER, *ROWS]).encode())[:-6])
    with pytest.raises(ExtractError, match=r"^cut\.csv\.gz: not a valid gzip file"):
        read_crm_file(path, source())


def test_missing_required_column_names_it(tmp_path):
    path = tmp_path / "no_phone.csv"
    path.write_text(csv_text([["Sak", "Phone", "Salgstidspunkt", "Utfall"], ["1", "2", "3", "sale"]]), encoding="utf-8")

    with pytest.raises(ExtractError) as caught:
        read_crm_file(path, source())

    message = str(caught.value)
    assert message == (
        "no_phone.csv: required column 'Telefon' (for caller_phone) not found; the file has "
        "'Sak', 'Phone', 'Salgstidspunkt', 'Utfall'. Fix the export or crm_source.columns"
    )
    assert "'Telefon'" in message and "caller_phone" in message


def test_missing_optional_column_is_simply_absent(tmp_path):
    path = tmp_path / "minimal.csv"
    path.write_text(csv_text([["Telefon", "Salgstidspunkt", "Utfall"], ["912 34 567", "2026-03-02 10:00", "sale"]]))
    frame = read_crm_file(path, source()).frame
    assert list(frame.columns) == ["caller_phone", "conversion_time", "outcome"]
    assert frame.loc[1].tolist() == ["912 34 567", "2026-03-02 10:00", "sale"]


def test_header_names_are_stripped(tmp_path):
    path = tmp_path / "spaced.csv"
    path.write_text(" Telefon ; Salgstidspunkt;Utfall \n912 34 567;2026-03-02 10:00;sale\n", encoding="utf-8")
    frame = read_crm_file(path, source()).frame
    assert frame.loc[1, "caller_phone"] == "912 34 567"
    assert frame.loc[1, "outcome"] == "sale"


def test_formula_cells_are_plain_text(tmp_path):
    path = tmp_path / "formulas.csv"
    rows = [
        ["Telefon", "Salgstidspunkt", "Utfall", "Beløp", "Sak"],
        ['=HYPERLINK("http://evil.example";"click")', "2026-03-02 10:00", "sale", "=1+2", "@SUM(A1:A2)"],
        ["+4791234567", "2026-03-02 10:01", "-2+3", "+5", "=cmd|' /C calc'!A0"],
    ]
    path.write_text(csv_text(rows), encoding="utf-8")

    frame = read_crm_file(path, source()).frame

    assert frame.loc[1, "caller_phone"] == '=HYPERLINK("http://evil.example";"click")'
    assert frame.loc[1, "value"] == "=1+2"
    assert frame.loc[1, "crm_id"] == "@SUM(A1:A2)"
    assert frame.loc[2, "caller_phone"] == "+4791234567"
    assert frame.loc[2, "outcome"] == "-2+3"
    assert frame.loc[2, "value"] == "+5"
    assert frame.loc[2, "crm_id"] == "=cmd|' /C calc'!A0"
    assert all(isinstance(v, str) for v in frame.loc[1].tolist())


def test_index_is_one_based_data_row_number(tmp_path):
    path = tmp_path / "rows.csv"
    body = [["Telefon", "Salgstidspunkt", "Utfall"]] + [[f"9123456{i}", "2026-03-02 10:00", "sale"] for i in range(5)]
    path.write_text(csv_text(body), encoding="utf-8")
    frame = read_crm_file(path, source()).frame
    assert list(frame.index) == [1, 2, 3, 4, 5]
    assert frame.loc[1, "caller_phone"] == "91234560"
    assert frame.loc[5, "caller_phone"] == "91234564"


def test_header_only_file_is_an_empty_frame(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("Telefon;Salgstidspunkt;Utfall\n", encoding="utf-8")
    frame = read_crm_file(path, source()).frame
    assert len(frame) == 0
    assert list(frame.columns) == ["caller_phone", "conversion_time", "outcome"]


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(ExtractError, match=r"^empty\.csv: not a readable CSV \(No columns to parse from file\)$"):
        read_crm_file(path, source())


def test_ragged_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("Telefon;Salgstidspunkt;Utfall\n1;2;3\n1;2;3;4;5\n", encoding="utf-8")
    with pytest.raises(ExtractError) as caught:
        read_crm_file(path, source())
    assert str(caught.value).startswith("ragged.csv: not a readable CSV (")
    assert "\n" not in str(caught.value)


def test_comma_delimiter(tmp_path):
    path = tmp_path / "comma.csv"
    path.write_text('Telefon,Salgstidspunkt,Utfall,Beløp\n912 34 567,2026-03-02 10:00,sale,"1,234.50"\n')
    frame = read_crm_file(path, source(delimiter=",", decimal=".")).frame
    assert frame.loc[1, "value"] == "1,234.50"


# --- finding the day's files ---------------------------------------------------------


def test_landing_files_picks_the_days_extracts_sorted(tmp_path):
    folder = day_folder(tmp_path, "acme", DAY)
    assert folder == tmp_path / "acme" / "2026-03-02"
    folder.mkdir(parents=True)
    for name in ("b.csv", "a.csv.gz", "UPPER.CSV", "notes.txt", "c.csv.bak", "d.gz", "e.csv.zip", "f.tsv"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.csv").mkdir()  # a folder is never a file to read
    (folder / "sub.csv" / "inner.csv").write_bytes(b"x")
    # Other days and other accounts are not this day's files.
    for other in (day_folder(tmp_path, "acme", date(2026, 3, 3)), day_folder(tmp_path, "other", DAY)):
        other.mkdir(parents=True)
        (other / "z.csv").write_bytes(b"x")
    (tmp_path / "acme" / "loose.csv").write_bytes(b"x")

    found = landing_files(tmp_path, "acme", DAY)

    assert [p.name for p in found] == ["UPPER.CSV", "a.csv.gz", "b.csv"]
    assert all(p.parent == folder for p in found)


def test_landing_files_missing_folder_is_empty(tmp_path):
    assert landing_files(tmp_path, "acme", DAY) == []
    (tmp_path / "acme").mkdir()
    assert landing_files(tmp_path, "acme", DAY) == []


def test_landing_files_empty_folder_is_empty(tmp_path):
    day_folder(tmp_path, "acme", DAY).mkdir(parents=True)
    assert landing_files(tmp_path, "acme", DAY) == []
