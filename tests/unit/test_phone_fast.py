"""The phone fast path gives exactly phonenumbers' answers.

normalise_phone (fast path first) is compared with _normalise_phone_full
(phonenumbers only) on example numbers of every region and type, on thousands
of seeded random numbers written the ways CRMs write them, and on hostile text.
"""

from __future__ import annotations

import random
import re._constants as sre
import re._parser as sre_parse

import pandas as pd
import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from callconv.intake import normalise, phone_fast
from callconv.intake.normalise import _normalise_phone_full, normalise_distinct, normalise_phone, normalise_phones

BENCH = ["SE", "NO", "DE", "GB", "US"]
OTHERS = ["FI", "DK", "FR", "IT", "RU", "KZ", "CA", "AR", "MX", "IN", "AU", "JP", "CN", "BR", "GG", "JE", "IM", "SJ"]
REGIONS = BENCH + OTHERS
TYPES = [value for name, value in vars(PhoneNumberType).items() if name.isupper()]
ALL_CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
EXTENSIONS = ["", "", "", " ext. 27", " x596", " #8", " EXT 5", " ext(12)", " x", " #", "#12#", " x 123"]
EXTENSIONS += ["ext 1234567890", " ext 123456789012345678901", " x1234567890", " #1234567890", " ext. 0", "x1#"]
TYPE_DESCS = ["fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost", "voip", "personal_number", "pager"]
TYPE_DESCS += ["uan", "voicemail", "general_desc"]


def mismatches(cases: list[tuple[str, str]]) -> list[tuple[str, str, object, object]]:
    """(text, region, fast, full) for every case where the two paths differ."""
    wrong = []
    for text, region in cases:
        fast, full = normalise_phone(text, region), _normalise_phone_full(text, region)
        if fast != full:
            wrong.append((text, region, fast, full))
    return wrong


def spaced(rng: random.Random, digits: str) -> str:
    """``digits`` with random separators between them, as people type them."""
    out = []
    for i, digit in enumerate(digits):
        if i and rng.random() < 0.3:
            out.append(rng.choice([" ", "-", ".", "  ", " - ", "\u00a0", "\t"]))
        out.append(digit)
    return "".join(out)


def written(rng: random.Random, code: int, nsn: str) -> str:
    """One way a CRM user writes +code nsn."""
    form = rng.randrange(9)
    body = spaced(rng, nsn)
    if form == 0:
        text = f"+{code} {body}"
    elif form == 1:
        text = f"00{code}{rng.choice(['', ' ', '-'])}{body}"
    elif form == 2:
        text = f"+{code} (0){body}"
    elif form == 3:
        text = f"(+{code}) {body}"
    elif form == 4:
        text = f"0{body}"
    elif form == 5:
        text = body
    elif form == 6:
        cut = rng.randrange(1, max(2, len(nsn)))
        text = f"(0{nsn[:cut]}) {spaced(rng, nsn[cut:])}"
    elif form == 7:
        text = f"+{code}{nsn}"
    else:
        text = f"{rng.choice(['1', '8', '011', '00', '000', '+0', '0 0'])}{body}"
    return text + rng.choice(EXTENSIONS)


def sample(pattern: str, rng: random.Random) -> str:
    """A random string that the metadata ``pattern`` matches (literals, classes, branches, repeats only)."""

    def walk(items) -> str:
        out = []
        for op, arg in items:
            if op == sre.LITERAL:
                out.append(chr(arg))
            elif op == sre.IN:
                choices = []
                for kind, value in arg:
                    if kind == sre.LITERAL:
                        choices.append(chr(value))
                    elif kind == sre.RANGE:
                        choices += [chr(c) for c in range(value[0], value[1] + 1)]
                    else:  # \d
                        choices += list("0123456789")
                out.append(rng.choice(choices))
            elif op == sre.BRANCH:
                out.append(walk(rng.choice(arg[1])))
            elif op == sre.MAX_REPEAT:
                low, high, body = arg
                high = min(high, low + 3)
                out.append("".join(walk(body) for _ in range(rng.randint(low, high))))
            elif op == sre.SUBPATTERN:
                out.append(walk(arg[-1]))
            else:
                raise ValueError(f"unexpected {op} in {pattern}")
        return "".join(out)

    return walk(sre_parse.parse(pattern))


def example_nsns(region: str) -> list[str]:
    found = []
    for kind in TYPES:
        example = phonenumbers.example_number_for_type(region, kind)
        if example is not None:
            found.append(phonenumbers.national_significant_number(example))
    return found


def test_example_numbers_of_every_region_and_type_in_plus_form() -> None:
    cases = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        code = phonenumbers.country_code_for_region(region)
        for nsn in example_nsns(region):
            cases += [(f"+{code} {nsn}", "SE"), (f"00{code}{nsn}", "US"), (f"+{code} (0){nsn}", "GB")]

    assert mismatches(cases) == []
    fast = sum(phone_fast.read_plain(normalise._fold(text), region) is not None for text, region in cases)
    assert fast > len(cases) * 0.6  # most go the fast way, or this test proves little


@pytest.mark.parametrize("region", REGIONS)
def test_example_numbers_written_nationally(region: str) -> None:
    cases = []
    for kind in TYPES:
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        nsn = phonenumbers.national_significant_number(example)
        national = phonenumbers.format_number(example, PhoneNumberFormat.NATIONAL)
        international = phonenumbers.format_number(example, PhoneNumberFormat.INTERNATIONAL)
        for text in (national, international, nsn, f"0{nsn}", f"{national} ext. 12", f"{international} #4"):
            cases += [(text, region), (text, "SE")]

    assert mismatches(cases) == []


@pytest.mark.parametrize("region", REGIONS)
def test_random_numbers(region: str) -> None:
    rng = random.Random(f"phone-fast-{region}")
    own_code = phonenumbers.country_code_for_region(region)
    near_codes = [phonenumbers.country_code_for_region(r) for r in REGIONS]
    examples = [nsn for r in REGIONS for nsn in example_nsns(r)]
    cases = []
    for _ in range(400):
        pick = rng.random()
        code = own_code if pick < 0.3 else rng.choice(near_codes) if pick < 0.8 else rng.choice(ALL_CODES)
        if rng.random() < 0.5:
            nsn = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 18)))
        else:  # a real number with its tail changed: often valid, sometimes in another region
            nsn = rng.choice(examples)
            keep = rng.randint(max(1, len(nsn) - 5), len(nsn))
            nsn = nsn[:keep] + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 3) + len(nsn) - keep))
        cases.append((written(rng, code, nsn), region))

    wrong = mismatches(cases)
    assert wrong == [], wrong[:10]


ALL_REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)


@pytest.mark.parametrize("part", range(5))
def test_numbers_drawn_from_each_regions_patterns(part: int) -> None:
    """NSNs that each region's own type patterns match (valid ones and near misses), written many ways.

    Shared country codes (+1, +7, +44, +47, +61, +262, +590...) choose the region by
    leading digits; this is where that choice is exercised. All regions, in five parts.
    """
    cases = []
    for region in ALL_REGIONS[part::5]:
        rng = random.Random(f"patterns-{region}")
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        code = metadata.country_code
        homes = [region, "SE", rng.choice(REGIONS)]
        for name in TYPE_DESCS:
            desc = getattr(metadata, name)
            if desc is None or not desc.national_number_pattern:
                continue
            for _ in range(2):
                nsn = sample(desc.national_number_pattern, rng)
                if rng.random() < 0.2:  # one digit more or less
                    nsn = nsn[:-1] if rng.random() < 0.5 else nsn + rng.choice("0123456789")
                home = rng.choice(homes)
                cases += [(f"+{code} {nsn}", home), (written(rng, code, nsn), home), (f"0{nsn}", region)]

    wrong = mismatches(cases)
    assert wrong == [], wrong[:10]


def test_idd_prefixes_that_are_not_00() -> None:
    """Home-region digits that start with the region's own international prefix are read as international."""
    cases = [
        ("990 46 70 123 45 67", "FI"),
        ("994 47 912 34 567", "FI"),
        ("99 123 4567", "FI"),
        ("011 46 70 123 45 67", "US"),
        ("011 44 20 7946 0958", "CA"),
        ("810 49 30 12345678", "RU"),
        ("8 10 46 70 123 45 67", "KZ"),
        ("00 46 70 123 45 67", "MX"),
        ("09 46 70 123 45 67", "MX"),
        ("0011 46 70 123 45 67", "AU"),
    ]
    assert mismatches(cases) == []


def test_the_bench_forms_go_the_fast_way_and_agree() -> None:
    forms = [
        "070-123 45 67",
        "0701234567",
        "+46 70 123 45 67",
        "+46 (0)70 1234567",
        "0046701234567",
        "(070) 123 45 67",
        "070.123.45.67",
        "070-123 45 67 ext. 27",
        "08-123 456 78",
        "+47 912 34 567",
        "0047 91234567",
        "(+47) 91.23.45.67",
        "0047 912 34 567 #7",
        "+49 (0)30 1234-5678",
        "+44 20 7946 0958",
        "+44-7400123456",
        "+1 (415) 555-2671",
        "+1.415.555.2671",
        "001-415-555-2671",
        "+1 415 555 2671 x671",
    ]
    for text in forms:
        assert phone_fast.read_plain(normalise._fold(text), "SE") is not None, text
    assert mismatches([(text, "SE") for text in forms]) == []


HOSTILE = [
    "",
    "+",
    "++46701234567",
    "+46+701234567",
    "46701234567",
    "0046 0701234567",
    "000701234567",
    "+0046701234567",
    "0",
    "00",
    "000",
    "+1",
    "+46 7",
    "+461",
    "(0)",
    ")(",
    "(((0701234567)))",
    "+(46)701234567",
    "0701234567#",
    "0701234567##1",
    "0701234567 x",
    "0701234567EXT12",
    "0701234567 ext(12)",
    "0701234567 ext. 123456789012345678901",
    "0701234567/x12",
    "0701234567 x12 x13",
    "tel:+46701234567",
    "+46701234567;ext=12",
    "tel:0701234567;phone-context=+46",
    "\uff10\uff17\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17",  # full-width digits
    "\u0660\u0667\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667",  # Arabic-Indic digits
    "+46\u200b701234567",
    "+46\n701234567",
    "070\u2013123 45 67",
    "+1 800 FLOWERS",
    "1-800-356-9377",
    "+800 1234 5678",
    "+979 123456789",
    "+882 13 1234 5678",
    "+999 12345678",
    "07012345678901234567890",
    "+4670123456789012345678",
    "1" * 300,
    "+46 70 123 45 67\x00",
    "n/a",
    "nan",
    "None",
    "abc",
    "0 7 0 1 2 3 4 5 6 7",
    "+46 (0) 8-123 456 78",
    "+44 (0)1481 256789",
    "+7 8 495 123 45 67",
    "8 495 123 45 67",
    "+39 06 1234 5678",
    "+39 312 345 6789",
    "+54 9 11 1234 5678",
]


@pytest.mark.parametrize("region", [*REGIONS, "se", "ZZ", "001", "XX"])
def test_hostile_text(region: str) -> None:
    assert mismatches([(text, region) for text in HOSTILE]) == []


def test_missing_values() -> None:
    for raw in (None, float("nan"), "", "  ", "\u00a0"):
        assert normalise_phone(raw, "SE") == _normalise_phone_full(raw, "SE") == (None, "phone_missing")


def test_normalise_phones_matches_the_full_path_row_by_row() -> None:
    rng = random.Random("frame")
    texts = [written(rng, rng.choice([46, 47, 49, 44, 1]), f"7{rng.randrange(10**8):08d}") for _ in range(500)]
    raw = pd.Series([*texts, *texts[:50], None, float("nan"), "", "912"], index=range(100, 654))

    out = normalise_phones(raw, "SE")

    expected = [_normalise_phone_full(value, "SE") for value in raw.tolist()]
    assert out.index.equals(raw.index)
    assert list(zip(out["e164"], out["reason"], strict=True)) == expected
    assert out["e164"].dtype == object and out["reason"].dtype == object


def test_spellings_that_differ_in_separators_are_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = normalise._read_folded
    monkeypatch.setattr(normalise, "_read_folded", lambda text, region: reads.append(text) or real(text, region))
    written_ways = ["+46 70 123 45 67", "+46-70-123 45 67", "0046 70.123.45.67", "+46701234567"]

    out = normalise_phones(pd.Series(written_ways * 100), "SE")
    by_value = normalise_distinct(written_ways, "SE")

    assert set(out["e164"]) == {"+46701234567"}
    assert set(by_value) == set(written_ways)
    assert reads == ["+46701234567", "+46701234567"]  # once per call
