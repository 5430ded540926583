"""Reading a stored file back in a test, as the pipeline reads it: bound to its account, class and path."""

from __future__ import annotations

from callconv.protection.storage import Area, open_for_read, sealer_for


def read_stored(engine, keyset, path, root, account_id: str, data_class: str) -> bytes:
    """The plaintext of ``path``, a file of ``data_class`` under ``root/account_id`` (sealed or plain)."""
    with open_for_read(path, Area(root, account_id, data_class), sealer_for(keyset, engine)) as stream:
        return stream.read()
