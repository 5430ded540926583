"""Hostile input without a database: paths out of the landing area, malformed and huge files, SQL text.

Each bad file is a clear one-line :class:`ExtractError`, raised without holding the file
in memory; the memory bound is measured on a generated ~200 MB file in a subprocess.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import os
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import pytest

from callconv.config import CrmColumns, CrmSource
from callconv.intake.extract import CrmFileReader, ExtractError, landing_files, read_crm_file
from callconv.protection import sealed
from callconv.protection.storage import Area, sealer_for

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAY = date(2026, 11, 27)
KEYSET = sealed.new_keyset()
SEALER = sealer_for(KEYSET, None)  # landing files have no generation counter: no warehouse needed
COLUMNS = CrmColumns(caller_phone="Telefon", conversion_time="Salgstidspunkt", outcome="Utfall", crm_id="Sak")
HEADER = "Sak;Telefon;Salgstidspunkt;Utfall\r\n"
ROW = "S-1;+47 912 34 567;2026-11-27 10:00:00;sale\r\n"


def source(**overrides) -> CrmSource:
    return CrmSource(**{"delimiter": ";", "columns": COLUMNS, **overrides})


def day_folder(root: Path) -> Path:
    folder = root / "acme" / DAY.isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def seal_landing(path: Path, data: bytes, keyset=KEYSET) -> None:
    """As the CRM's exporter does (``python -m callconv.protection.sealed seal``): class landing, generation 0."""
    logical = f"{path.parent.name}/{path.name.removesuffix('.enc')}"
    path.write_bytes(sealed.seal_bytes(data, keyset, sealed.Binding("acme", "landing", logical, 0)))


def landing_area(path: Path) -> Area:
    return Area(path.parents[2], "acme", "landing")


def one_line_error(path, **overrides) -> str:
    with pytest.raises(ExtractError) as caught:
        read_crm_file(path, source(**overrides), SEALER, landing_area(path))
    message = str(caught.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- paths


def test_a_symlink_to_a_file_outside_the_landing_area_is_refused(tmp_path):
    secret = tmp_path / "elsewhere" / "passwd.csv"
    secret.parent.mkdir()
    secret.write_text(HEADER + ROW)
    folder = day_folder(tmp_path / "landing")
    (folder / "deals.csv").symlink_to(secret)

    with pytest.raises(ExtractError) as caught:
        landing_files(tmp_path / "landing", "acme", DAY)
    assert str(caught.value).startswith("refusing landing file 'deals.csv': it resolves to a place outside")


def test_a_symlink_to_a_device_is_refused_too(tmp_path):
    folder = day_folder(tmp_path / "landing")
    (folder / "zero.csv").symlink_to("/dev/zero")
    with pytest.raises(ExtractError, match="refusing landing file 'zero.csv'"):
        landing_files(tmp_path / "landing", "acme", DAY)


def test_a_day_folder_that_is_a_symlink_out_of_the_landing_area_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "deals.csv").write_text(HEADER + ROW)
    (tmp_path / "landing" / "acme").mkdir(parents=True)
    (tmp_path / "landing" / "acme" / DAY.isoformat()).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ExtractError, match=f"refusing day folder '{DAY}'"):
        landing_files(tmp_path / "landing", "acme", DAY)


def test_a_symlink_inside_the_folder_and_dot_dot_names(tmp_path):
    folder = day_folder(tmp_path / "landing")
    (folder / "real.csv").write_text(HEADER + ROW)
    (folder / "alias.csv").symlink_to(folder / "real.csv")
    assert [p.name for p in landing_files(tmp_path / "landing", "acme", DAY)] == ["alias.csv", "real.csv"]
    (folder / "..hidden.csv").write_text(HEADER)
    with pytest.raises(ExtractError, match="refusing landing file name outside its folder"):
        landing_files(tmp_path / "landing", "acme", DAY)


# --------------------------------------------------------------------------- malformed files


def test_binary_garbage(tmp_path):
    path = tmp_path / "garbage.csv"
    path.write_bytes(os.urandom(200_000))
    assert one_line_error(path) == "garbage.csv: not readable as utf-8-sig; set crm_source.encoding"
    # Read as latin-1 every byte is a letter: the file is still refused, in one short line.
    message = one_line_error(path, encoding="latin-1")
    assert message.startswith("garbage.csv: ") and len(message) < 1000
    assert "looks" not in message  # no delimiter hint for garbage


def test_unterminated_quote(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text(HEADER + 'S-1;"+47 912 34 567;2026-11-27 10:00:00;sale\r\n' + ROW * 10)
    assert one_line_error(path).startswith("quote.csv: not a readable CSV (EOF inside string starting at row ")


def test_unterminated_quote_in_a_long_file_stops_at_the_field_limit(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text(HEADER + 'S-1;"+47 912 34 567;2026-11-27 10:00:00;sale\r\n' + ROW * 10_000)
    limit = csv.field_size_limit()
    assert (
        one_line_error(path)
        == f"quote.csv: not a readable CSV (a field longer than {limit} characters: an unterminated quote?)"
    )


def test_wrong_delimiter_names_the_one_the_file_seems_to_use(tmp_path):
    path = tmp_path / "comma.csv"
    path.write_text(HEADER.replace(";", ",") + ROW.replace(";", ","))
    message = one_line_error(path)
    assert message.startswith("comma.csv: required column 'Telefon' (for caller_phone), ")
    assert "the file looks ','-separated; check crm_source.delimiter" in message


def test_a_headerless_file_does_not_put_a_phone_number_in_the_error(tmp_path):
    path = tmp_path / "headerless.csv"
    path.write_text(ROW * 3)
    message = one_line_error(path)
    assert "912" not in message and "<a name with digits, not shown>" in message


def test_a_line_without_line_breaks_is_refused_before_it_fills_memory(tmp_path):
    path = tmp_path / "one-line.csv"
    path.write_bytes(HEADER.encode() + b"x;" * (3 * 1024 * 1024))
    assert one_line_error(path) == (
        "one-line.csv: not a readable CSV (a line runs on for more than 1 MiB without a line break); "
        "nothing was imported"
    )


def test_more_fields_than_the_header_is_refused_but_trailing_delimiters_are_not(tmp_path):
    shifted = tmp_path / "shifted.csv"
    shifted.write_text(HEADER + ROW.replace("\r\n", ";extra\r\n"))
    assert one_line_error(shifted) == "shifted.csv: not a readable CSV (Expected 4 fields in line 2, saw 5)"
    trailing = tmp_path / "trailing.csv"
    trailing.write_text(HEADER + ROW.replace("\r\n", ";\r\n"))
    frame = read_crm_file(trailing, source()).frame
    assert frame.loc[1, "caller_phone"] == "+47 912 34 567"  # never shifted into the next column


def test_a_gzip_bomb_is_stopped_at_the_size_limit(tmp_path):
    path = tmp_path / "bomb.csv.gz"
    path.write_bytes(gzip.compress((HEADER + ROW * 60_000).encode()))  # 2.6 MB unzipped, 30 kB zipped
    assert path.stat().st_size < 100_000
    assert one_line_error(path, max_file_mb=1).startswith("bomb.csv.gz: larger than 1 MiB once decrypted and unzipped")


def test_sealed_files_that_do_not_decrypt(tmp_path):
    path = day_folder(tmp_path / "landing") / "deals.csv.enc"
    seal_landing(path, (HEADER + ROW).encode(), keyset=sealed.new_keyset())
    refused = "deals.csv.enc: landing file '2026-11-27/deals.csv' of account 'acme' does not decrypt as generation 0"
    assert one_line_error(path).startswith(refused)
    seal_landing(path, (HEADER + ROW * 100_000).encode())
    path.write_bytes(path.read_bytes()[:-100])
    message = one_line_error(path)
    assert message.startswith(refused) and "truncated" in message and "912" not in message


def test_a_sealed_drop_reads_like_its_plaintext(tmp_path):
    folder = day_folder(tmp_path / "landing")
    plain, sealed_drop = folder / "deals.csv", folder / "deals-sealed.csv.enc"
    plain.write_text(HEADER + ROW * 5)
    seal_landing(sealed_drop, plain.read_bytes())
    from_plain = read_crm_file(plain, source())
    from_sealed = read_crm_file(sealed_drop, source(), SEALER, landing_area(sealed_drop))
    assert from_sealed.checksum == from_plain.checksum  # the plaintext's, so a second drop is recognised
    assert from_sealed.frame.equals(from_plain.frame)


def test_chunks_are_numbered_by_data_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(HEADER + "".join(ROW.replace("S-1", f"S-{n}") for n in range(1, 8)))
    reader = CrmFileReader(path, source(chunk_rows=3))
    scan = reader.scan(max_rows=100)
    chunks = list(reader.chunks(scan.checksum))
    assert scan.rows == 7 and [list(chunk.index) for chunk in chunks] == [[1, 2, 3], [4, 5, 6], [7]]
    assert chunks[2].loc[7, "crm_id"] == "S-7"
    with pytest.raises(ExtractError, match=r"^rows\.csv: more than 6 rows, the limit set by validation\.max_rows"):
        reader.scan(max_rows=6)
    path.write_text(HEADER + ROW)
    with pytest.raises(ExtractError, match="changed while it was being read"):
        list(reader.chunks(scan.checksum))


# --------------------------------------------------------------------------- SQL


SQL_CALLS = {"text", "exec_driver_sql", "execute", "executescript", "literal_column"}
SQL_START = ("select ", "insert ", "update ", "delete ", "create ", "drop ", "alter ", "with ", "truncate ")
# Google Ads Query Language has no bound parameters: the preflight's query on conversion_action
# takes the config's action ids, which are digits (checked by the config and again where built).
GAQL_RESOURCES = ("from conversion_action ",)


def test_no_sql_in_the_package_is_built_from_strings():
    """Every query is SQLAlchemy Core with bound parameters: no f-string, % or + or .format SQL."""
    offences = []
    for path in sorted((PROJECT_ROOT / "include" / "callconv").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(PROJECT_ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in SQL_CALLS and node.args and _built(node.args[0]):
                    offences.append(f"{where}: {name}() of a built string")
            if isinstance(node, ast.JoinedStr):
                literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant)).lstrip().lower()
                if literal.startswith(SQL_START) and not any(resource in literal for resource in GAQL_RESOURCES):
                    offences.append(f"{where}: f-string SQL")
    assert offences == []


def _built(node: ast.AST) -> bool:
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return True
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


# --------------------------------------------------------------------------- a 200 MB file


MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from datetime import datetime, UTC
    from pathlib import Path
    import sqlalchemy as sa
    from callconv.config import parse_settings
    from callconv.intake.extract import CrmFileReader, ExtractError
    from callconv.protection.sealed import keyset_from_json
    from callconv.protection.storage import Area, sealer_for
    from callconv.intake.take_in import take_in_day
    from callconv.protection.pseudonyms import PseudonymKeys

    root, rows = Path(sys.argv[1]), int(sys.argv[2])
    keyset = keyset_from_json(sys.argv[3])

    def settings(**limits):
        return parse_settings({
            "crm_source": {"delimiter": ";", "columns": {"caller_phone": "Telefon",
                "conversion_time": "Salgstidspunkt", "outcome": "Utfall", "crm_id": "Sak"},
                "max_file_mb": limits.get("max_file_mb", 1024)},
            "validation": {"max_rows": limits.get("max_rows", 5_000_000)},
            "accounts": [{"id": "acme", "customer_id": "1112223333", "timezone": "UTC",
                "default_region": "NO", "default_currency": "NOK",
                "conversion_actions": {"sale": {"id": "1", "name": "Sale"}}}],
        })

    def take_in(landing, **limits):
        config = settings(**limits)
        try:
            take_in_day(sa.create_engine("sqlite://"), config, config.account("acme"),
                        datetime(2026, 11, 27, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC), "run",
                        landing_root=landing, keyset=keyset, keys=PseudonymKeys.generate("unit"))
        except ExtractError as error:
            return str(error)
        return None

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the whole encrypted file is decrypted, hashed and parsed; the row limit stops it at its end
    by_rows = take_in(root / "encrypted", max_rows=rows - 1)
    # the plaintext file is stopped by the size limit
    by_size = take_in(root / "plain", max_file_mb=150)
    scan_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    # the second pass, which the intake validates and stores: pandas chunks of chunk_rows rows
    reader = CrmFileReader(next((root / "encrypted").rglob("*.enc")), settings().crm_source,
                           sealer_for(keyset, None), Area(root / "encrypted", "acme", "landing"))
    chunked_rows = sum(len(chunk) for chunk in reader.chunks())
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    print(json.dumps({"by_rows": by_rows, "by_size": by_size, "scan_growth_mb": scan_growth_mb,
                      "chunked_rows": chunked_rows, "growth_mb": growth_mb}))
    """
)


def test_a_200_mb_file_is_streamed_in_bounded_memory_and_refused_by_its_limits(tmp_path):
    plain = tmp_path / "plain" / "acme" / DAY.isoformat() / "big.csv"
    plain.parent.mkdir(parents=True)
    rows = 0
    with plain.open("w", encoding="utf-8", newline="") as handle:  # written in blocks, never whole
        handle.write(HEADER)
        while handle.tell() < 200 * 1024 * 1024:
            block = range(rows, rows + 20_000)
            handle.write("".join(f"S-{n};+47 9{n % 10**7:07d};2026-11-27 10:00:00;sale\r\n" for n in block))
            rows += 20_000
    encrypted = tmp_path / "encrypted" / "acme" / DAY.isoformat() / "big.csv.enc"
    encrypted.parent.mkdir(parents=True)
    binding = sealed.Binding("acme", "landing", f"{DAY.isoformat()}/big.csv", 0)
    with plain.open("rb") as stream, encrypted.open("wb") as out:  # streamed, as the exporter would
        sealed.seal_stream(stream, out, KEYSET, binding)

    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(rows), sealed.keyset_to_json(KEYSET)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "include")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["by_rows"] == (
        f"big.csv.enc: more than {rows - 1} rows, the limit set by validation.max_rows; nothing was imported"
    )
    assert measured["by_size"] == (
        "big.csv: larger than 150 MiB once decrypted and unzipped, the limit set by crm_source.max_file_mb; "
        "nothing was imported"
    )
    # Scanning holds a row at a time: half the file in memory would already break this bound.
    assert measured["scan_growth_mb"] < 100, measured
    # Reading it in pandas chunks (100,000 rows each) stays bounded too.
    assert measured["chunked_rows"] == rows
    assert measured["growth_mb"] < 400, measured
