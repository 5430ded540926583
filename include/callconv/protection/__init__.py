"""The data promises: keyed pseudonyms, sealed files, retention and redaction."""
