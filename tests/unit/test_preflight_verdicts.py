"""The preflight's verdict on the actions Google reported: one line, each problem named with its key."""

from __future__ import annotations

from callconv.config import parse_settings
from callconv.preflight import Verdict, action_problems

ACCOUNT = parse_settings(
    {
        "crm_source": {"columns": {"caller_phone": "p", "conversion_time": "t", "outcome": "o"}},
        "accounts": [
            {
                "id": "acme",
                "customer_id": "123-456-7890",
                "timezone": "Europe/Oslo",
                "default_region": "NO",
                "default_currency": "NOK",
                "conversion_actions": {
                    "sale": {"id": "1", "name": "Phone sale"},
                    "upsell": {"id": "2", "name": "Upsell"},
                },
            }
        ],
    }
).accounts[0]


def test_enabled_call_imports_have_no_problem():
    assert action_problems(ACCOUNT, {"1": ("UPLOAD_CALLS", "ENABLED"), "2": ("UPLOAD_CALLS", "ENABLED")}) == []


def test_each_problem_names_the_action_its_key_and_the_fix():
    problems = action_problems(ACCOUNT, {"1": ("WEBPAGE", "HIDDEN")})
    assert problems == [
        "conversion action 1 (Phone sale, accounts[acme].conversion_actions.sale) is of type WEBPAGE, not "
        "UPLOAD_CALLS: use an action that imports calls from clicks (Import > Phone calls)",
        "conversion action 1 (Phone sale, accounts[acme].conversion_actions.sale) is HIDDEN, not ENABLED: "
        "enable it in Google Ads or configure another action",
        "conversion action 2 (Upsell, accounts[acme].conversion_actions.upsell) does not exist in customer "
        "123-456-7890: fix its id",
    ]


def test_a_verdict_is_one_line():
    assert Verdict("acme").line() == "acme: ok"
    assert Verdict("acme", "the connection is missing", outage=False).line() == "acme: the connection is missing"
    assert not Verdict("acme", "Google Ads could not be reached", outage=True).ok
