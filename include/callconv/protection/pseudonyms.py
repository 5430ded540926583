"""Keyed pseudonyms: every key the warehouse derives from a phone number is an HMAC-SHA256.

Which keys: every ``conversion_key`` (account, caller, call start, action; a late
sale's own conversion adds its sale key) and every ``sale_key`` (the content when the
CRM gave no id: account, caller, conversion time, outcome and value). All of these
fields but the number are stored beside the key, so a plain SHA-256 of them gave the
number back to anyone who tried the 10^8 Norwegian mobile numbers (minutes on one
core). Under an HMAC the same search needs the key. A sale key made of a CRM id holds
no number, but it is keyed too: a redacted sale (its CRM id removed) is then not found
again from the id by whoever holds the CRM export.

The key is the **pseudonym keyring**, the password of the Airflow connection
``pseudonym_conn_id`` (default ``call_conversions_pseudonym``)::

    {"primary": "2026-12", "keys": {"2026-12": "<urlsafe base64 of 32 random bytes>"}}

New keys are made under the primary; its id is stored beside every key
(``crm_sales.sale_key_id`` and ``conversion_key_id``, ``matches.conversion_key_id``,
``upload_ledger.conversion_key_id``; ``delivery_conflicts`` holds copies of keys whose
ids are on the rows they name). ``python -m callconv.protection.pseudonyms new-keyring
--key-id 2026-12`` prints a new keyring.

It is not the retention key (``hmac_conn_id``): that one stays the same for years, since
the ``caller_hmac`` it writes links a redacted caller across time; this one rotates, and
its old keys can be destroyed once re-keyed (see :func:`rekey_account`), after which
the keys of redacted rows lead to nobody.

The warehouse records, per account, the key id its rows are under
(``pseudonym_key_state``). Intake and matching refuse to make keys under another key,
so a rotation never mixes keys within one conversion; :func:`rekey_account` moves the
account's rows and the record together, under the intake and match locks.

HMAC is computed where the key is: in Python for sale keys, in the warehouse for
conversion keys, built from SHA-256 over bytes as ``H((K ^ opad) || H((K ^ ipad) || m))``
with the padded key halves as bound parameters (no extension such as pgcrypto).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from callconv.schema import pseudonym_key_state
from callconv.sqlhash import enable_on, hmac_sha256_hex, sha256_hex
from callconv.sqltime import utc_second_text

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "call_conversions_pseudonym"
# The Alembic migration and the command line read the conn id from here when no config is at hand.
CONN_ID_ENV_VAR = "CALL_CONVERSIONS_PSEUDONYM_CONN_ID"
KEY_BYTES = 32
BLOCK_BYTES = 64  # SHA-256's block size: the HMAC key is padded to it
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_SHAPE = '{"primary": "<key id>", "keys": {"<key id>": "<urlsafe base64 of 32 random bytes>"}}'
_NEW_KEYRING_HINT = "make one with: python -m callconv.protection.pseudonyms new-keyring --key-id <id>"


class PseudonymKeyError(ValueError):
    """The pseudonym keyring is missing or malformed. The message never holds key material."""


class PseudonymKeyRotated(RuntimeError):
    """The keyring's primary is not the key an account's rows are under: re-key first."""


# ------------------------------------------------------------------ keys


@dataclass(frozen=True, repr=False)
class PseudonymKey:
    """One named HMAC-SHA256 key."""

    key_id: str
    secret: bytes

    def __repr__(self) -> str:  # never show key material
        return f"PseudonymKey({self.key_id!r})"

    def hexdigest(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    @property
    def pads(self) -> tuple[bytes, bytes]:
        """(K ^ ipad, K ^ opad): what the warehouse needs to compute this HMAC from SHA-256."""
        block = self.secret if len(self.secret) <= BLOCK_BYTES else hashlib.sha256(self.secret).digest()
        block = block.ljust(BLOCK_BYTES, b"\0")
        return bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block)

    def sql(self, text) -> hmac_sha256_hex:
        """This HMAC of a SQL text expression, hex encoded, computed by the warehouse."""
        inner, outer = self.pads
        return hmac_sha256_hex(inner, outer, text)


class PseudonymKeys:
    """Named pseudonym keys; ``primary`` makes every new key. The others are kept only while rows
    keyed under them are re-keyed (:func:`rekey_account` checks a row's key under its own key id)."""

    __slots__ = ("_keys", "_primary")

    def __init__(self, keys: Mapping[str, bytes], primary: str):
        if not keys:
            raise PseudonymKeyError(f"pseudonym keyring has no keys; {_NEW_KEYRING_HINT}")
        for key_id, secret in keys.items():
            if not isinstance(key_id, str) or not KEY_ID.match(key_id):
                raise PseudonymKeyError(f"pseudonym key id {key_id!r} must be 1-32 letters, digits, '.', '_' or '-'")
            if len(secret) < KEY_BYTES:
                raise PseudonymKeyError(
                    f"pseudonym key {key_id!r} is {len(secret)} bytes; it must be at least {KEY_BYTES} random bytes "
                    f"({_NEW_KEYRING_HINT})"
                )
        if primary not in keys:
            raise PseudonymKeyError(f"pseudonym keyring's primary {primary!r} is not among its keys {sorted(keys)}")
        self._keys = {key_id: PseudonymKey(key_id, bytes(secret)) for key_id, secret in keys.items()}
        self._primary = primary

    def __repr__(self) -> str:
        return f"PseudonymKeys(primary={self._primary!r}, key_ids={self.key_ids!r})"

    @property
    def primary(self) -> PseudonymKey:
        return self._keys[self._primary]

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def key(self, key_id: str) -> PseudonymKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise PseudonymKeyError(
                f"rows are keyed under pseudonym key {key_id!r}, which the keyring does not hold (it has "
                f"{self.key_ids}); put it back until the rows are re-keyed"
            ) from None

    @classmethod
    def generate(cls, key_id: str) -> PseudonymKeys:
        return cls({key_id: secrets.token_bytes(KEY_BYTES)}, key_id)

    def rotated(self, key_id: str) -> PseudonymKeys:
        """This keyring plus a new random key that becomes primary."""
        if key_id in self._keys:
            raise PseudonymKeyError(f"pseudonym key id {key_id!r} is already in the keyring; pick a new one")
        keys = {kid: key.secret for kid, key in self._keys.items()}
        return PseudonymKeys({**keys, key_id: secrets.token_bytes(KEY_BYTES)}, key_id)

    def without(self, key_id: str) -> PseudonymKeys:
        keys = {kid: key.secret for kid, key in self._keys.items() if kid != key_id}
        return PseudonymKeys(keys, self._primary)

    def to_text(self) -> str:
        """The keyring as JSON (it holds the keys: treat it as a secret)."""
        keys = {kid: base64.urlsafe_b64encode(key.secret).decode("ascii") for kid, key in sorted(self._keys.items())}
        return json.dumps({"primary": self._primary, "keys": keys})

    def secret_texts(self) -> list[str]:
        """Every form of each key a log line could show, for the log masker."""
        texts = []
        for key in self._keys.values():
            texts += [base64.urlsafe_b64encode(key.secret).decode("ascii"), key.secret.hex()]
        return texts

    @classmethod
    def from_text(cls, text: str, source: str = "pseudonym keyring") -> PseudonymKeys:
        if not isinstance(text, str) or not text.strip():
            raise PseudonymKeyError(f"{source} is empty; expected JSON like {_SHAPE} ({_NEW_KEYRING_HINT})")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:  # the position only: the text holds keys
            raise PseudonymKeyError(
                f"{source} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                f"expected {_SHAPE}"
            ) from None
        return cls.from_mapping(raw, source)

    @classmethod
    def from_mapping(cls, raw: Any, source: str = "pseudonym keyring") -> PseudonymKeys:
        if not isinstance(raw, Mapping) or set(raw) - {"primary", "keys"} or not isinstance(raw.get("keys"), Mapping):
            raise PseudonymKeyError(f"{source} must be a JSON object like {_SHAPE}")
        keys = {}
        for key_id, encoded in raw["keys"].items():
            try:
                keys[key_id] = base64.urlsafe_b64decode(str(encoded).encode("ascii") + b"==")
            except (binascii.Error, ValueError, UnicodeEncodeError):
                raise PseudonymKeyError(f"{source}: key {key_id!r} is not urlsafe base64") from None
        primary = raw.get("primary")
        if primary is None and len(keys) == 1:
            primary = next(iter(keys))
        try:
            return cls(keys, primary)
        except PseudonymKeyError as error:
            raise PseudonymKeyError(f"{source}: {error}") from None


def keys_from_airflow(conn_id: str) -> PseudonymKeys:
    """The keyring in Airflow connection ``conn_id``'s password (or its AIRFLOW_CONN_* variable).

    Each key is handed to Airflow's log masker, as connection passwords are.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        password = Connection.get(conn_id).password
    except AirflowNotFoundException:
        raise PseudonymKeyError(
            f"Airflow connection {conn_id!r} (pseudonym_conn_id) is not defined: it must hold the pseudonym keyring "
            f"JSON in its password; {_NEW_KEYRING_HINT}"
        ) from None
    keys = PseudonymKeys.from_text(password or "", source=f"pseudonym keyring in Airflow connection {conn_id!r}")
    from callconv.runtime import register_secret

    for text in keys.secret_texts():
        register_secret(text)
    return keys


# ------------------------------------------------------------------ what is keyed


def utc_second(moment: datetime) -> str:
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; everything else keeps its zone."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def conversion_text(account_id: str, caller_e164: str, call_start: datetime, action_id: str) -> str:
    """One call (as Google sees it) and one action: what a conversion key is the HMAC of."""
    return f"{account_id}|{caller_e164}|{utc_second(call_start)}|{action_id}"


def separate_text(main_text: str, sale_key: str) -> str:
    """A late sale's own conversion (policy ``new_conversion``): its call, its action and the sale."""
    return f"{main_text}|sale|{sale_key}"


def crm_text(account_id: str, crm_id: str) -> str:
    """A sale the CRM gave an id is that id (whitespace around it is not identity)."""
    return f"{account_id}|crm|{crm_id.strip()}"


def sale_text(account_id: str, caller_e164: str, conversion_time: datetime, outcome: str, value) -> str:
    """A sale without a CRM id is its content. ``value`` is a Decimal of 4 places, or None."""
    moment = conversion_time.to_pydatetime() if hasattr(conversion_time, "to_pydatetime") else conversion_time
    return "|".join(str(part) for part in (account_id, caller_e164, as_utc(moment).isoformat(), outcome, value))


def conversion_text_sql(account_id: str, caller, call_start, action_id):
    """:func:`conversion_text` built by the warehouse, character for character."""
    return sa.literal(f"{account_id}|") + caller + "|" + utc_second_text(call_start) + "|" + action_id


# ------------------------------------------------------------------ the key an account's rows are under


def require_current(connection, account_id: str, keys: PseudonymKeys) -> None:
    """Refuse to make keys under anything but the key the account's rows are under.

    An account seen for the first time is recorded under the keyring's primary.
    """
    recorded = connection.scalar(
        sa.select(pseudonym_key_state.c.key_id).where(pseudonym_key_state.c.account_id == account_id)
    )
    if recorded is None:
        _record(connection, account_id, keys.primary.key_id)
        return
    if recorded != keys.primary.key_id:
        raise PseudonymKeyRotated(
            f"account {account_id!r}: its rows are keyed under pseudonym key {recorded!r} but the keyring's primary "
            f"is {keys.primary.key_id!r}; re-key them first: python -m callconv.protection.pseudonyms rekey --account "
            f"{account_id} (README, 'Rotating the pseudonym key')"
        )


def _record(connection, account_id: str, key_id: str) -> None:
    # Intake and matching of one account hold different locks: both may find no record.
    state = pseudonym_key_state
    row = {"account_id": account_id, "key_id": key_id}
    dialect = connection.dialect.name
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        insert = (postgresql if dialect == "postgresql" else sqlite).insert
        connection.execute(insert(state).values(row).on_conflict_do_nothing(index_elements=["account_id"]))
        return
    connection.execute(
        state.insert().from_select(
            ["account_id", "key_id"],
            sa.select(sa.literal(account_id), sa.literal(key_id)).where(
                ~sa.exists().where(state.c.account_id == account_id)
            ),
        )
    )


# ------------------------------------------------------------------ re-keying (rotation, migration)

LEGACY = None  # the key id of keys made before they were keyed: a plain SHA-256 of the same text
REKEY_CHUNK = 2000


def _wrapped(primary: PseudonymKey, old_key: str) -> str:
    """A legacy key whose number is gone (redacted) keyed in turn: the same old key always
    gives the same new one, so the tables that share it still agree, and a guess needs the key."""
    return primary.hexdigest(f"legacy|{old_key}")


@dataclass
class RekeyOutcome:
    account_id: str
    key_id: str
    sale_keys: int = 0
    conversion_keys: int = 0
    wrapped: int = 0  # legacy keys of redacted rows, keyed over the old key

    def as_counts(self) -> dict:
        return {
            "account": self.account_id,
            "key_id": self.key_id,
            "sale_keys": self.sale_keys,
            "conversion_keys": self.conversion_keys,
            "wrapped_legacy_keys": self.wrapped,
        }


def _map_table(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("old_key", sa.String(64), primary_key=True),
        sa.Column("new_key", sa.String(64), nullable=False),
        prefixes=["TEMPORARY"],
    )


def _digest_sql(keys: PseudonymKeys, key_id: str | None, text):
    return sha256_hex(text) if key_id is LEGACY else keys.key(key_id).sql(text)


def rekey_account(connection, account_id: str, keys: PseudonymKeys, *, tables=None) -> RekeyOutcome:
    """Move every key of an account to the keyring's primary, in ``connection``'s transaction.

    * A key whose row still holds its number is computed afresh under the primary. A
      conversion key is first checked under the key id stored beside it (a plain SHA-256
      for legacy rows, id NULL), which tells a late sale's own conversion from its call's.
    * Every row holding the same old key gets the same new key, so sales, matches, the
      ledger and the conflicts still agree, redacted rows included.
    * A legacy key that no number can recompute (all its rows were redacted) is keyed over
      itself under the primary. A keyed one keeps its key and key id: it identifies its
      rows and nothing else, and once that old key is destroyed it leads to nobody.

    Call it with the intake and match locks held (:func:`rekey` does). Refuses while any
    of the account's conversions is being sent (state ``sending``). ``tables`` lets the
    Alembic migration pass its own definitions of the same tables.
    """
    from callconv import schema

    t = tables or schema
    sales, matches_, ledger, conflicts = t.crm_sales, t.matches, t.upload_ledger, t.delivery_conflicts
    primary = keys.primary
    outcome = RekeyOutcome(account_id, primary.key_id)
    sending = connection.scalar(
        sa.select(sa.func.count())
        .select_from(ledger)
        .where(ledger.c.account_id == account_id, ledger.c.state == "sending")
    )
    if sending:
        raise PseudonymKeyRotated(
            f"account {account_id!r}: {sending} conversions are being sent (state 'sending'); pause the account's "
            "import and rerun DAGs and let the upload finish before re-keying"
        )
    enable_on(connection)
    sale_map, key_map = _map_table("tmp_rekey_sales"), _map_table("tmp_rekey_conversions")
    for table in (sale_map, key_map):
        table.drop(connection, checkfirst=True)
        table.create(connection)

    # 1. Sale keys, in Python (the text has Python's own formats), page by page.
    def not_under_primary(column):
        return sa.or_(column.is_(None), column != primary.key_id)

    content = sa.and_(sales.c.account_id == account_id, not_under_primary(sales.c.sale_key_id))
    after = None
    while True:
        query = sa.select(
            sales.c.sale_key,
            sales.c.sale_key_id,
            sales.c.crm_id,
            sales.c.caller_e164,
            sales.c.conversion_time,
            sales.c.outcome,
            sales.c.conversion_value,
        ).where(content)
        if after is not None:
            query = query.where(sales.c.sale_key > after)
        page = connection.execute(query.order_by(sales.c.sale_key).limit(REKEY_CHUNK)).all()
        if not page:
            break
        after = page[-1].sale_key
        items = []
        for row in page:
            if row.crm_id is not None and row.crm_id.strip():
                items.append({"old_key": row.sale_key, "new_key": primary.hexdigest(crm_text(account_id, row.crm_id))})
            elif row.caller_e164 is not None:
                text = sale_text(account_id, row.caller_e164, row.conversion_time, row.outcome, row.conversion_value)
                items.append({"old_key": row.sale_key, "new_key": primary.hexdigest(text)})
            elif row.sale_key_id is LEGACY:
                items.append({"old_key": row.sale_key, "new_key": _wrapped(primary, row.sale_key)})
                outcome.wrapped += 1
        if items:
            connection.execute(sale_map.insert(), items)
        outcome.sale_keys += len(items)

    # 2. Conversion keys, in the warehouse: each old key id checks its own keys.
    old_ids = set()
    for table in (sales, matches_, ledger):
        old_ids.update(
            connection.scalars(
                sa.select(table.c.conversion_key_id)
                .where(
                    table.c.account_id == account_id,
                    table.c.conversion_key.is_not(None),
                    not_under_primary(table.c.conversion_key_id),
                )
                .distinct()
            )
        )

    def unmapped(column):
        return ~sa.exists().where(key_map.c.old_key == column)

    for old_id in sorted(old_ids, key=lambda kid: kid or ""):
        same_id = sales.c.conversion_key_id.is_(None) if old_id is LEGACY else sales.c.conversion_key_id == old_id
        main = conversion_text_sql(
            account_id, sales.c.caller_e164, sales.c.matched_call_start, sales.c.conversion_action_id
        )
        new_sale_key = sa.func.coalesce(sale_map.c.new_key, sales.c.sale_key)
        new_key = sa.case(
            (_digest_sql(keys, old_id, main) == sales.c.conversion_key, primary.sql(main)),
            (
                _digest_sql(keys, old_id, main + "|sale|" + sales.c.sale_key) == sales.c.conversion_key,
                primary.sql(main + "|sale|" + new_sale_key),
            ),
        )
        candidates = (
            sa.select(sales.c.conversion_key.label("old_key"), new_key.label("new_key"))
            .select_from(sales.outerjoin(sale_map, sale_map.c.old_key == sales.c.sale_key))
            .where(
                sales.c.account_id == account_id,
                same_id,
                sales.c.conversion_key.is_not(None),
                sales.c.caller_e164.is_not(None),
                sales.c.matched_call_start.is_not(None),
            )
            .subquery("candidates")
        )
        connection.execute(
            key_map.insert().from_select(
                ["old_key", "new_key"],
                sa.select(candidates.c.old_key, sa.func.min(candidates.c.new_key))
                .where(candidates.c.new_key.is_not(None), unmapped(candidates.c.old_key))
                .group_by(candidates.c.old_key),
            )
        )
        for table in (matches_, ledger):
            same_id = table.c.conversion_key_id.is_(None) if old_id is LEGACY else table.c.conversion_key_id == old_id
            main = conversion_text_sql(
                account_id, table.c.caller_e164, table.c.call_start, table.c.conversion_action_id
            )
            candidates = (
                sa.select(
                    table.c.conversion_key.label("old_key"),
                    sa.case((_digest_sql(keys, old_id, main) == table.c.conversion_key, primary.sql(main))).label(
                        "new_key"
                    ),
                )
                .where(
                    table.c.account_id == account_id,
                    same_id,
                    table.c.caller_e164.is_not(None),
                    unmapped(table.c.conversion_key),
                )
                .subquery("candidates")
            )
            connection.execute(
                key_map.insert().from_select(
                    ["old_key", "new_key"],
                    sa.select(candidates.c.old_key, candidates.c.new_key).where(candidates.c.new_key.is_not(None)),
                )
            )
    # Legacy keys no number recomputes: keyed over themselves, the same in every table.
    for table in (sales, matches_, ledger):
        legacy = (
            sa.select(table.c.conversion_key)
            .where(
                table.c.account_id == account_id,
                table.c.conversion_key.is_not(None),
                table.c.conversion_key_id.is_(None),
                unmapped(table.c.conversion_key),
            )
            .distinct()
        )
        wrapped = [{"old_key": old, "new_key": _wrapped(primary, old)} for old in connection.scalars(legacy)]
        for start in range(0, len(wrapped), REKEY_CHUNK):
            connection.execute(key_map.insert(), wrapped[start : start + REKEY_CHUNK])
        outcome.wrapped += len(wrapped)
    outcome.conversion_keys = connection.scalar(sa.select(sa.func.count()).select_from(key_map))

    # 3. Write: one UPDATE per table and key, through the maps.
    for table, column, id_column, mapping in (
        (sales, "sale_key", "sale_key_id", sale_map),
        (conflicts, "sale_key", None, sale_map),
        (sales, "conversion_key", "conversion_key_id", key_map),
        (matches_, "conversion_key", "conversion_key_id", key_map),
        (ledger, "conversion_key", "conversion_key_id", key_map),
        (conflicts, "conversion_key", None, key_map),
    ):
        values = {column: mapping.c.new_key}
        if id_column:
            values[id_column] = sa.literal(primary.key_id)
        connection.execute(
            table.update().where(table.c.account_id == account_id, table.c[column] == mapping.c.old_key).values(values)
        )
    for table in (sale_map, key_map):
        table.drop(connection)
    state = t.pseudonym_key_state
    if connection.scalar(sa.select(state.c.key_id).where(state.c.account_id == account_id)) is None:
        connection.execute(state.insert().values(account_id=account_id, key_id=primary.key_id))
    else:
        connection.execute(state.update().where(state.c.account_id == account_id).values(key_id=primary.key_id))
    log.info(
        "pseudonyms: account %s re-keyed under %s: %d sale keys, %d conversion keys (%d legacy keys of redacted rows "
        "keyed over themselves)",
        account_id,
        primary.key_id,
        outcome.sale_keys,
        outcome.conversion_keys,
        outcome.wrapped,
    )
    return outcome


def accounts_with_keys(connection, tables=None) -> list[str]:
    from callconv import schema

    t = tables or schema
    found: set[str] = set()
    for table in (t.crm_sales, t.matches, t.upload_ledger):
        found.update(connection.scalars(sa.select(table.c.account_id).distinct()))
    return sorted(found)


def rekey(engine: sa.Engine, keys: PseudonymKeys, account_ids: list[str] | None = None) -> list[RekeyOutcome]:
    """Re-key accounts (all that hold keys by default), each in one transaction under its locks."""
    from callconv.warehouse import serialise, serialised_session

    with engine.connect() as connection:
        accounts = account_ids or accounts_with_keys(connection)
    done = []
    for account_id in accounts:
        with serialised_session(engine, "intake", account_id), engine.begin() as connection:
            serialise(connection, "match", account_id)
            serialise(connection, "file_delivery", account_id)
            done.append(rekey_account(connection, account_id, keys))
    return done


# ------------------------------------------------------------------ command line


def local_connection(path) -> str:
    """For the demo and ``make airflow`` only: the connection JSON of a keyring kept in ``path``
    (made once, readable by its owner alone), so a local warehouse keeps its keys across runs.
    Production keeps the keyring in a connection of its secrets backend."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(PseudonymKeys.generate("local-1").to_text())
    keys = PseudonymKeys.from_text(path.read_text(), source=f"pseudonym keyring in {path}")
    return json.dumps({"conn_type": "generic", "password": keys.to_text()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m callconv.protection.pseudonyms",
        description="Pseudonym keyrings and re-keying (README, data protection)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-keyring", help="print a new keyring JSON with one random key")
    new.add_argument("--key-id", required=True)
    rotate = commands.add_parser("rotate", help="print the keyring of --conn-id plus a new primary key")
    rotate.add_argument("--key-id", required=True)
    rotate.add_argument("--conn-id", default=os.environ.get(CONN_ID_ENV_VAR, DEFAULT_CONN_ID))
    redo = commands.add_parser("rekey", help="move the warehouse's keys to the keyring's primary")
    redo.add_argument("--conn-id", default=os.environ.get(CONN_ID_ENV_VAR, DEFAULT_CONN_ID))
    redo.add_argument("--url", default=os.environ.get("CALL_CONVERSIONS_WAREHOUSE_URL"))
    redo.add_argument("--account", action="append", help="an account id (repeatable); default every account")
    local = commands.add_parser("local-connection", help="demo only: print a connection JSON kept in --file")
    local.add_argument("--file", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "new-keyring":
            print(PseudonymKeys.generate(args.key_id).to_text())
        elif args.command == "local-connection":
            print(local_connection(args.file))
        elif args.command == "rotate":
            print(keys_from_airflow(args.conn_id).rotated(args.key_id).to_text())
        else:
            if not args.url:
                parser.error("give --url or set CALL_CONVERSIONS_WAREHOUSE_URL")
            from callconv.warehouse import create_engine

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            engine = create_engine(args.url)
            for outcome in rekey(engine, keys_from_airflow(args.conn_id), args.account):
                print(json.dumps(outcome.as_counts()))
    except (PseudonymKeyError, PseudonymKeyRotated) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
