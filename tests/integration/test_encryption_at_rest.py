"""Encryption at rest, end to end: the import DAG with encryption required and a test Tink keyset.

Reuses the known data set of ``test_import_dag``. After a run, every file under the
landing, archive, quarantine, export and Data Docs roots is scanned: each is named
``.enc``, is a Tink Streaming AEAD ciphertext (its header-length byte) and holds no known
phone number, in E.164 or as the CRM wrote it. Reading it bound to its account, class and
path gives the expected rows back. The task log holds no number either.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime

import pytest
import sqlalchemy as sa
import yaml
from stored import read_stored
from test_import_dag import (  # the known data set and its fixtures
    ACCOUNT,
    CALLS,
    CRM_ROWS,
    DAY,
    EXPECTED_CONVERSIONS,
    EXPECTED_QUARANTINE,
    OSLO,
    project,  # noqa: F401 - a fixture
    run_import_dag,
    sandbox,  # noqa: F401 - a fixture
)

from callconv.intake.normalise import normalise_phone
from callconv.schema import crm_imports, crm_sales, run_summary, sealed_generations

pytestmark = pytest.mark.integration

ROOTS = ("landing", "archive", "quarantine", "export", "docs")
TINK_HEADER_LENGTH = 40  # AES256_GCM_HKDF_1MB: 1 length byte, 32 bytes of salt, 7 of nonce prefix
RUN_DATE = datetime(2026, 11, 28, tzinfo=OSLO)


def known_numbers() -> set[str]:
    """Every phone number of the data set: as written in the CRM and the call logs, and in E.164."""
    written = {row[1] for row in CRM_ROWS} | {number for _, number, *_ in CALLS}
    numbers = set()
    for text in written:
        e164 = normalise_phone(text, "NO")[0]
        if e164 is None:
            continue
        numbers |= {text, e164, e164.removeprefix("+47"), e164.removeprefix("+")}
    return numbers


def stored_files(project_dir) -> dict[str, list]:
    return {root: sorted(p for p in (project_dir / root).rglob("*") if p.is_file()) for root in ROOTS}


def test_every_stored_file_is_encrypted_and_no_number_is_in_plaintext_or_the_log(
    project,  # noqa: F811
    warehouse,
    test_keyset,
    caplog,
    capfd,
):
    caplog.set_level("DEBUG")
    landing_file = project / "landing" / ACCOUNT / DAY.isoformat() / "deals.csv"
    original = landing_file.read_bytes()
    numbers = known_numbers()
    assert {"+4791234567", "+47 912 34 567", "91234567", "(+47) 93.45.67.89"} <= numbers
    assert any(number.encode() in original for number in numbers)  # the scan below can find them

    assert run_import_dag(RUN_DATE).state == "success"

    files = stored_files(project)
    assert files["landing"] == []  # the plaintext landing file is gone
    assert [p.name for p in files["archive"]] == ["deals.csv.enc"]
    assert [p.name for p in files["quarantine"]] == [f"quarantine_{ACCOUNT}_{DAY}.csv.enc"]
    assert [p.name for p in files["export"]] == [f"call_conversions_{ACCOUNT}_{DAY}.csv.enc"]
    assert any(p.name == "index.html.enc" for p in files["docs"]) and len(files["docs"]) > 10
    for path in (path for paths in files.values() for path in paths):
        blob = path.read_bytes()
        assert blob[0] == TINK_HEADER_LENGTH and not blob.startswith(b"CCENC"), path
        assert path.name.endswith(".enc"), path
        leaked = sorted(number for number in numbers if number.encode() in blob)
        assert leaked == [], path

    # With the keyset, each file read as what it is gives back what it holds.
    [archived], [quarantined], [exported] = files["archive"], files["quarantine"], files["export"]

    def read(path, data_class):
        return read_stored(warehouse, test_keyset, path, project / data_class, ACCOUNT, data_class)

    assert read(archived, "archive") == original
    lines = list(csv.reader(io.StringIO(read(exported, "export").decode("utf-8"))))
    assert lines[0] == ["Parameters:TimeZone=Europe/Oslo"]
    rows = {(row[0], row[3], row[4], row[5]) for row in lines[2:]}
    expected = {
        (f"\t{e164}", conversion_time.astimezone(OSLO).isoformat(sep=" "), f"{value:f}", currency)
        for e164, _, _, conversion_time, value, currency, _ in EXPECTED_CONVERSIONS
    }
    assert rows == expected
    quarantine_rows = list(csv.DictReader(io.StringIO(read(quarantined, "quarantine").decode())))
    assert {int(row["source_row"]): row["reason"] for row in quarantine_rows} == EXPECTED_QUARANTINE
    assert quarantine_rows[0]["caller_phone"] in {"12", "91234567"}  # debug data: the raw record, decrypted
    docs_index = next(p for p in files["docs"] if p.name == "index.html.enc")
    assert b"callconv_extract_rows" in read(docs_index, "docs")
    with warehouse.connect() as connection:  # one generation per sealed file, each written once
        generations = connection.execute(
            sa.select(sealed_generations.c.data_class, sealed_generations.c.generation)
        ).all()
    assert sorted({data_class for data_class, _ in generations}) == ["archive", "docs", "export", "quarantine"]
    assert len(generations) == sum(len(files[root]) for root in ROOTS) and {g for _, g in generations} == {1}

    logged = caplog.text + "".join(capfd.readouterr())
    assert sorted(number for number in numbers if number in logged) == []
    assert "archived as deals.csv.enc" in logged and "stored in plaintext" not in logged

    # The same file dropped again is recognised by its checksum, and removed again.
    landing_file.write_bytes(original)
    assert run_import_dag(RUN_DATE).state == "success"
    assert not landing_file.exists()
    with warehouse.connect() as connection:
        counts = (
            connection.execute(sa.select(run_summary.c.counts).order_by(run_summary.c.updated_at.desc()))
            .scalars()
            .first()
        )
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_imports)) == 1
    assert counts["intake"]["files_already_imported"] == 1 and counts["intake"]["read"] == 0


def test_without_a_keyset_required_encryption_refuses_to_run(project, warehouse, monkeypatch, capfd):  # noqa: F811
    monkeypatch.delenv("CALL_CONVERSIONS_ENCRYPTION_KEYS")
    dag_run = run_import_dag(RUN_DATE)
    assert dag_run.state == "failed"
    output = "".join(capfd.readouterr())
    assert (
        "encryption is required (encryption.required: true) but no keyset is set: put the Tink keyset JSON in the "
        "password of Airflow connection 'call_conversions_encryption' or in the environment variable "
        "CALL_CONVERSIONS_ENCRYPTION_KEYS"
    ) in output
    assert (project / "landing" / ACCOUNT / DAY.isoformat() / "deals.csv").exists()  # nothing touched
    assert not (project / "archive").exists() and not (project / "export").exists()
    with warehouse.connect() as connection:
        assert connection.scalar(sa.select(sa.func.count()).select_from(crm_sales)) == 0


def test_encryption_disabled_in_the_config_stores_plaintext_and_says_so(project, monkeypatch, capfd, caplog):  # noqa: F811
    monkeypatch.delenv("CALL_CONVERSIONS_ENCRYPTION_KEYS")
    config_path = project / "call_conversions.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["encryption"] = {"required": False}
    config_path.write_text(yaml.safe_dump(config))

    assert run_import_dag(RUN_DATE).state == "success"

    logged = caplog.text + "".join(capfd.readouterr())
    assert "files are stored in plaintext because encryption is disabled in the config" in logged
    exported = project / "export" / ACCOUNT / DAY.isoformat() / f"call_conversions_{ACCOUNT}_{DAY}.csv"
    assert exported.read_text(encoding="utf-8").startswith("Parameters:TimeZone=Europe/Oslo")
    assert (project / "archive" / ACCOUNT / DAY.isoformat() / "deals.csv").is_file()
    assert json.dumps(config["encryption"]) == '{"required": false}'
