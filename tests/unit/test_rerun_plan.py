"""The rerun DAG's request checks, and its trigger form's schema."""

from __future__ import annotations

import copy

import pytest

from callconv.rerun import RerunRequestError, plan_days


def test_plan_covers_every_day_for_every_account_in_order():
    plan = plan_days("2026-10-24", "2026-10-26", ["b", "a"], ["a", "b", "c"])
    assert plan == [
        {"account_id": "a", "day": "2026-10-24"},
        {"account_id": "b", "day": "2026-10-24"},
        {"account_id": "a", "day": "2026-10-25"},
        {"account_id": "b", "day": "2026-10-25"},
        {"account_id": "a", "day": "2026-10-26"},
        {"account_id": "b", "day": "2026-10-26"},
    ]


def test_end_before_start_is_refused_with_both_dates_named():
    with pytest.raises(RerunRequestError, match="end_date 2026-10-01 is before start_date 2026-10-05"):
        plan_days("2026-10-05", "2026-10-01", ["a"], ["a"])


def test_unknown_account_is_refused_naming_the_known_ones():
    with pytest.raises(RerunRequestError, match=r"unknown or no accounts \['zzz'\]; configured accounts: a, b"):
        plan_days("2026-10-05", "2026-10-05", ["a", "zzz"], ["a", "b"])


def test_not_a_date_is_refused():
    with pytest.raises(RerunRequestError, match="must be dates"):
        plan_days("yesterday", "2026-10-05", ["a"], ["a"])


@pytest.fixture()
def rerun_params():
    from dags.call_conversions_rerun import build_rerun_dag

    return build_rerun_dag().params


def form(rerun_params, **values):
    """What the trigger form does with the user's values: merge them in and validate the schema."""
    merged = copy.deepcopy(rerun_params)
    merged.update(values)
    return merged.validate()


def test_trigger_form_accepts_a_good_request(rerun_params):
    values = form(rerun_params, start_date="2026-10-24", end_date="2026-10-26", accounts=["nordic_plumbing"])
    assert values["accounts"] == ["nordic_plumbing"] and values["dry_run"] is False and values["rematch"] is True


def test_trigger_form_refuses_an_unknown_account(rerun_params):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="accounts"):
        form(rerun_params, start_date="2026-10-24", end_date="2026-10-26", accounts=["no_such_account"])


def test_trigger_form_refuses_a_malformed_date(rerun_params):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="start_date"):
        form(rerun_params, start_date="2026-13-45", end_date="2026-10-26", accounts=["nordic_plumbing"])


def test_trigger_form_needs_dates(rerun_params):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        form(rerun_params, accounts=["nordic_plumbing"])


def test_a_data_manager_account_gets_days_of_its_own_delivery():
    from callconv.rerun import split_by_delivery

    plan = [{"account_id": "dm", "day": "2026-11-02"}, {"account_id": "api", "day": "2026-11-02"}]
    split = split_by_delivery(plan, {"dm": "data_manager", "api": "api"})
    assert split == {"api": [plan[1]], "file": [], "data_manager": [plan[0]]}
