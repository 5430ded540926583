"""The generation counter on PostgreSQL under concurrent writers: no lost update, no unreadable file.

The rerun DAG maps days in parallel, so several tasks write one account's files at once;
and the daily import and a rerun may write the very same path. With one row per path and an
advisory lock per path, every file stays readable and every write takes its own generation.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from callconv.protection.sealed import new_keyset
from callconv.protection.storage import Area, open_for_read, sealer_for, store
from callconv.schema import sealed_generations
from callconv.warehouse import create_engine

pytestmark = pytest.mark.integration

DAYS = [f"2026-11-{day:02d}" for day in range(1, 13)]


@pytest.fixture()
def engine(warehouse):
    """The pipeline's own engine kind (hide_parameters), with a pool big enough for the threads."""
    own = create_engine(warehouse.url.render_as_string(hide_password=False))
    yield own
    own.dispose()


def read(path, area, sealer) -> bytes:
    with open_for_read(path, area, sealer) as stream:
        return stream.read()


def test_parallel_days_of_one_account_each_keep_their_generation(tmp_path, engine):
    sealer = sealer_for(new_keyset(), engine)
    area = Area(tmp_path / "export", "acme", "export")

    def write(day: str):
        return store(area, f"{day}/conversions.csv", day.encode() * 1000, sealer)

    with ThreadPoolExecutor(max_workers=6) as pool:
        paths = dict(zip(DAYS, pool.map(write, DAYS), strict=True))

    assert all(read(paths[day], area, sealer) == day.encode() * 1000 for day in DAYS)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(sealed_generations.c.logical_path, sealed_generations.c.generation)).all()
    assert sorted(rows) == [(f"{day}/conversions.csv", 1) for day in DAYS]


def test_concurrent_writers_of_one_path_take_turns(tmp_path, engine):
    sealer = sealer_for(new_keyset(), engine)
    area = Area(tmp_path / "quarantine", "acme", "quarantine")
    logical = "2026-11-27/quarantine_acme_2026-11-27.csv"

    def write(n: int):
        return store(area, logical, f"write {n}\n".encode() * 50_000, sealer)  # 0.5 MB each

    with ThreadPoolExecutor(max_workers=4) as pool:
        [path] = set(pool.map(write, range(8)))

    with engine.connect() as connection:
        assert connection.scalar(sa.select(sealed_generations.c.generation)) == 8  # no write lost its number
    text = read(path, area, sealer).decode()
    assert text.startswith("write ") and len(set(text.splitlines())) == 1  # one whole write, the last one
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
