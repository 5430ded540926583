"""Every SQLAlchemy engine the project makes hides bound parameters from its errors.

Without ``hide_parameters`` a database error prints the statement's parameters, and a
failed insert of sales prints every caller's number in it into the task log. The
end-to-end proof on PostgreSQL is ``tests/integration/test_no_numbers_in_errors.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sqlalchemy as sa

from callconv.warehouse import create_engine

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("include", "plugins", "dags", "bench")
ENGINE_FACTORIES = {"create_engine", "engine_from_config", "create_async_engine"}


def _engine_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, sets hide_parameters=True) for each engine factory call not through callconv.warehouse."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ours = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "callconv.warehouse"
        for alias in node.names
    }
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name not in ENGINE_FACTORIES or (isinstance(func, ast.Name) and name in ours):
            continue
        hidden = any(
            keyword.arg == "hide_parameters" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True
            for keyword in node.keywords
        )
        calls.append((node.lineno, hidden))
    return calls


def test_every_engine_factory_call_in_the_project_sets_hide_parameters():
    found, open_calls = 0, []
    for folder in SOURCE_FOLDERS:
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            for line, hidden in _engine_calls(path):
                found += 1
                if not hidden:
                    open_calls.append(f"{path.relative_to(PROJECT_ROOT)}:{line}")
    assert found >= 3  # the warehouse, the sandbox, Alembic (and the benchmarks)
    assert open_calls == [], f"engines that would print bound parameters in errors: {open_calls}"


@pytest.mark.parametrize("url", ["sqlite://", "postgresql+psycopg2://nobody@127.0.0.1:1/none"])
def test_the_warehouse_engine_hides_parameters(url):
    engine = create_engine(url)
    assert engine.hide_parameters is True
    engine.dispose()


def test_a_failed_statement_names_no_parameter():
    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        connection.execute(sa.text("create table sales (caller text unique)"))
        connection.execute(sa.text("insert into sales values (:caller)"), {"caller": "+4791234567"})
        with pytest.raises(sa.exc.IntegrityError) as caught:
            connection.execute(sa.text("insert into sales values (:caller)"), {"caller": "+4791234567"})
    assert "+4791234567" not in str(caught.value)
    assert "parameters hidden" in str(caught.value)
