"""Hashing for the Data Manager API against the examples in Google's formatting guide."""

import hashlib

import pytest

from callconv.delivery.data_manager.hashing import UnhashablePhone, format_phone, hash_phone, is_hashed_phone


def test_google_example_us_number_is_formatted_as_e164():
    # Google's "Format user data": the US number (800)555-0100 becomes +18005550100.
    assert format_phone("(800)555-0100", "US") == "+18005550100"


def test_leading_and_trailing_whitespace_is_trimmed_before_hashing():
    assert hash_phone("  +18005550100\n") == hash_phone("+18005550100")


def test_hash_is_lower_case_hex_sha256_of_the_e164_bytes():
    expected = hashlib.sha256(b"+18005550100").hexdigest()
    assert hash_phone(format_phone(" (800) 555-0100 ", "US")) == expected
    assert is_hashed_phone(expected)
    assert expected == expected.lower() and len(expected) == 64


def test_hash_of_a_known_value():
    # A fixed vector, so a change of algorithm or encoding cannot pass unnoticed.
    assert hash_phone("+18005550100") == "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"
    assert hash_phone("+4722334455") != hash_phone("+4722334456")


@pytest.mark.parametrize("bad", ["800 555 0100", "+0123", "+1 800 555 0100", "", "+1800555010012345"])
def test_not_e164_is_refused_without_the_number_in_the_message(bad):
    with pytest.raises(UnhashablePhone) as caught:
        hash_phone(bad)
    digits = "".join(ch for ch in bad if ch.isdigit())
    assert not digits or digits not in str(caught.value)


def test_an_unhashed_number_is_not_taken_for_a_hash():
    assert not is_hashed_phone("+18005550100")
