"""The Airflow UI, in a real headless browser, against a real api-server with the project's DAGs and plugin.

The test starts ``airflow api-server`` on a free local port, with an Airflow home
of its own (SQLite metadata DB, the simple auth manager with known passwords),
the project's ``dags/`` and ``plugins/``, and the PostgreSQL warehouse of
``tests/conftest.py`` seeded with a week of run summaries. In Chromium (Debian's
package, driven by Playwright) it then checks that:

* the call-conversions page refuses anonymous visitors (401, or the login page);
* a user who logs in sees the import DAG's trigger form with its Params' titles, and the
  rerun DAG's form with its accounts as a multi-select; Airflow refuses a rerun whose
  accounts are not in the config;
* the page is on the UI's navigation bar, and shows the chart (Vega-Lite, drawn from the
  script the page serves itself: no request leaves the machine), x-axis labels that do not
  overlap, the seeded counts and each day's state, with no phone number anywhere;
* a DAG-run link on the page opens that run in the Airflow UI, for the import DAG and for
  the rerun DAG.

Screenshots go to ``var/test-artifacts/``. A browser that cannot be installed, or a
server that does not come up, fails the test with the reason; it never skips.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import pytest
import yaml

from callconv.schema import run_summary, upload_ledger

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = PROJECT_ROOT / "var" / "test-artifacts"
INSTALL_SCRIPT = PROJECT_ROOT / "tests" / "browser" / "install_browser.sh"
CHROMIUM = "/usr/bin/chromium"

ACCOUNT, SPARE_ACCOUNT = "ui_shop", "ui_spare"
DAG_ID = f"call_conversions_import__{ACCOUNT}"
RERUN_DAG_ID = "call_conversions_rerun"
OSLO = ZoneInfo("Europe/Oslo")
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-password-for-tests"
WAREHOUSE_CONN_ID = "call_conversions_warehouse"
PHONE = "+4791234567"
SERVER_START_SECONDS = 90
UI_TIMEOUT_MS = 20_000


# ------------------------------------------------------------------ tools


@pytest.fixture(scope="module")
def playwright_api():
    """Debian's chromium and Playwright's Python package, installed here when missing."""
    try:
        result = subprocess.run(
            ["bash", str(INSTALL_SCRIPT), sys.executable], capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"installing the browser ({INSTALL_SCRIPT}) took more than 15 minutes", pytrace=False)
    if result.returncode != 0 or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"the browser test needs {CHROMIUM} and Playwright, and {INSTALL_SCRIPT.name} could not install them "
            f"(exit {result.returncode}):\n{result.stdout[-1500:]}\n{result.stderr[-2500:]}",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.fail(f"Playwright was installed but cannot be imported: {error}", pytrace=False)
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as error:  # noqa: BLE001 - turned into a clear failure
            pytest.fail(f"Chromium at {CHROMIUM} would not start under Playwright: {error}", pytrace=False)
        yield browser
        browser.close()


# ------------------------------------------------------------------ the Airflow api-server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(path: Path) -> Path:
    """The project's config, with two accounts of our own (one with runs, one without)."""
    raw = yaml.safe_load((PROJECT_ROOT / "config" / "call_conversions.yaml").read_text(encoding="utf-8"))
    template = raw["accounts"][0]
    raw["warehouse_conn_id"] = WAREHOUSE_CONN_ID
    raw["accounts"] = [
        {**template, "id": ACCOUNT, "timezone": "Europe/Oslo", "default_region": "NO"},
        {**template, "id": SPARE_ACCOUNT, "timezone": "Europe/Oslo", "default_region": "NO"},
    ]
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def airflow_env(home: Path, config: Path, port: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "_AIRFLOW")) and key != "CALL_CONVERSIONS_CONFIG"
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret-for-the-ui-test-only",
            "AIRFLOW__API__SECRET_KEY": "secret-key-for-the-ui-test-only",
            "CALL_CONVERSIONS_CONFIG": str(config),
        }
    )
    return env


def run_airflow(args: list[str], env: dict[str, str], what: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=240
    )
    if result.returncode != 0:
        pytest.fail(
            f"{what} failed (airflow {' '.join(args[:2])}, exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def airflow_server(pg_schema_url, tmp_path_factory):
    """``airflow api-server`` on a free port, with the DAGs serialized and the warehouse connection in its DB."""
    home = tmp_path_factory.mktemp("airflow-home")
    port = free_port()
    env = airflow_env(home, write_config(home / "call_conversions.yaml"), port)
    # The simple auth manager keeps its passwords in this file; writing it first makes them known.
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({ADMIN_USER: ADMIN_PASSWORD}))
    run_airflow(["db", "migrate"], env, "migrating the Airflow metadata DB")
    run_airflow(["dags", "reserialize"], env, "serializing the project's DAGs")
    run_airflow(
        [
            "connections",
            "add",
            WAREHOUSE_CONN_ID,
            "--conn-type",
            "generic",
            "--conn-extra",
            json.dumps({"sqlalchemy_url": pg_schema_url}),
        ],
        env,
        "adding the warehouse connection",
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "api-server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, port, log_path)
        yield base_url
    finally:
        stop(server)


def wait_until_up(server: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"airflow api-server exited with {server.returncode} before serving; its log ({log_path}) ends:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}",
                pytrace=False,
            )
        try:
            if request("GET", port, "/api/v2/monitor/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"airflow api-server did not answer on 127.0.0.1:{port} within {SERVER_START_SECONDS} s; "
        f"its log ({log_path}) ends:\n{log_path.read_text(errors='replace')[-4000:]}",
        pytrace=False,
    )


def stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


def request(method: str, port: int, path: str, headers: dict | None = None, body: dict | None = None):
    """One HTTP request, redirects not followed: (status, headers, body text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        all_headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode(errors="replace")
    finally:
        connection.close()


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def api_token(base_url: str) -> str:
    status, _, text = request(
        "POST", port_of(base_url), "/auth/token", body={"username": ADMIN_USER, "password": ADMIN_PASSWORD}
    )
    assert status == 201, f"POST /auth/token answered {status}: {text[:300]}"
    return json.loads(text)["access_token"]


def trigger_run(base_url: str, token: str, day: date) -> str:
    """A real DAG run for the account-local day (queued: no scheduler runs here), for the page to link to.

    Its logical date is the day's end: a manual run covers the timetable's interval up to it.
    """
    run_id = f"manual__ui_test_{day:%Y%m%d}"
    logical = datetime.combine(day + timedelta(days=1), clock(0), tzinfo=OSLO).astimezone(UTC).isoformat()
    status, _, text = request(
        "POST",
        port_of(base_url),
        f"/api/v2/dags/{DAG_ID}/dagRuns",
        headers={"Authorization": f"Bearer {token}"},
        body={"dag_run_id": run_id, "logical_date": logical, "conf": {}},
    )
    assert status == 200, f"triggering {DAG_ID} answered {status}: {text[:500]}"
    return run_id


def trigger_rerun(base_url: str, token: str, conf: dict, run_id: str | None = None) -> tuple[int, str]:
    """Trigger the rerun DAG as its form does; returns (status, body)."""
    body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
    status, _, text = request(
        "POST",
        port_of(base_url),
        f"/api/v2/dags/{RERUN_DAG_ID}/dagRuns",
        headers={"Authorization": f"Bearer {token}"},
        body=body,
    )
    return status, text


# ------------------------------------------------------------------ warehouse rows


def seed(warehouse, days: list[date], linked_run_id: str, rerun_id: str) -> dict[date, dict]:
    """One run per day: the newest under the real import run's id, the next under the real rerun's.

    Returns what each day's row must show.
    """
    expected = {}
    with warehouse.begin() as connection:
        for index, day in enumerate(days):
            read, quarantined = 40 + index, {"phone_too_short": 1 + index % 2}
            sales = read - sum(quarantined.values())
            unmatched = {"no_call_from_number": 2 + index % 3}
            matched = sales - sum(unmatched.values())
            uploaded, parked = matched - 1, {"TOO_RECENT_CALL": 1}
            run_id, dag_id = {0: (linked_run_id, DAG_ID), 1: (rerun_id, RERUN_DAG_ID)}.get(
                index, (f"scheduled__{day:%Y-%m-%d}T23:00:00+00:00", DAG_ID)
            )
            start = datetime.combine(day, clock(0), tzinfo=OSLO).astimezone(UTC)
            connection.execute(
                run_summary.insert().values(
                    run_id=run_id,
                    account_id=ACCOUNT,
                    business_date=day,
                    window_start=start,
                    window_end=start + timedelta(days=1),
                    updated_at=start + timedelta(days=1, minutes=30),
                    dag_id=dag_id,
                    counts={
                        "intake": {"read": read, "normalised": sales, "quarantined": quarantined, "warnings": []},
                        "match": {"sales": sales, "matched": matched, "unmatched": unmatched, "conversions": matched},
                        "upload": {"dry_run": False, "accepted": uploaded, "already_existed": 0, "parked": parked},
                    },
                )
            )
            expected[day] = {
                "run_id": run_id,
                "dag_id": dag_id,
                "read": str(read),
                "matched": str(matched),
                "match_rate": f"{matched / sales * 100:.1f}%",
                "uploaded": str(uploaded),
            }
        # Two parked and one failed conversion, with a phone number that must never reach the page.
        for key, state, code, day in [
            ("ab" * 32, "parked", "TOO_RECENT_CALL", days[0]),
            ("cd" * 32, "parked", "TOO_RECENT_CALL", days[1]),
            ("ef" * 32, "failed", "EXPIRED_EVENT", days[2]),
        ]:
            moment = datetime.combine(day, clock(10), tzinfo=OSLO).astimezone(UTC)
            connection.execute(
                upload_ledger.insert().values(
                    conversion_key=key,
                    account_id=ACCOUNT,
                    business_date=day,
                    state=state,
                    caller_e164=PHONE,
                    call_start=moment - timedelta(hours=1),
                    conversion_action_id="555000111",
                    conversion_time=moment,
                    park_until=moment + timedelta(hours=12) if state == "parked" else None,
                    error_code=code,
                    error_message=f"call from {PHONE} is too recent",
                    run_id=linked_run_id,
                )
            )
    return expected


# ------------------------------------------------------------------ the test


X_AXIS_LABELS = """(chart) => {
    // The first axis-label group Vega draws is the x axis; labels it left out have opacity 0.
    const group = chart.querySelector("svg g.role-axis-label");
    return Array.from(group.querySelectorAll("text"))
        .filter((text) => text.getAttribute("opacity") !== "0")
        .map((text) => { const box = text.getBoundingClientRect(); return [box.left, box.right, text.textContent]; })
        .sort((a, b) => a[0] - b[0]);
}"""


def test_call_conversions_page_in_the_airflow_ui(playwright_api, airflow_server, warehouse):
    from playwright.sync_api import expect

    base_url, port = airflow_server, port_of(airflow_server)
    today = datetime.now(OSLO).date()
    days = [today - timedelta(days=offset) for offset in (1, 2, 3, 4, 5, 6, 40)]
    token = api_token(base_url)
    linked_run_id = trigger_run(base_url, token, days[0])
    rerun_id = f"manual__ui_rerun_{days[1]:%Y%m%d}"
    rerun_conf = {"start_date": f"{days[1]}", "end_date": f"{days[1]}", "accounts": [ACCOUNT]}
    status, text = trigger_rerun(base_url, token, rerun_conf, rerun_id)
    assert status == 200, f"triggering {RERUN_DAG_ID} answered {status}: {text[:500]}"
    expected = seed(warehouse, days, linked_run_id, rerun_id)

    # What the rerun's form refuses, Airflow refuses from the API too; an end before the start is plan's.
    status, text = trigger_rerun(base_url, token, {**rerun_conf, "accounts": ["not_configured"]})
    assert status == 400 and "accounts" in text, (status, text[:500])
    status, text = trigger_rerun(base_url, token, {**rerun_conf, "accounts": [ACCOUNT, ACCOUNT]})
    assert status == 400, (status, text[:500])

    # Anonymous or forged: refused (401/403); a browser is sent to the login page.
    status, _, _ = request("GET", port, "/call-conversions/")
    assert status == 401
    status, headers, _ = request("GET", port, "/call-conversions/", headers={"Accept": "text/html"})
    assert status == 303 and headers["location"].startswith("/auth/login"), (status, headers)
    status, _, _ = request("GET", port, "/call-conversions/", headers={"Authorization": "Bearer not-a-token"})
    assert status in (401, 403)
    status, _, _ = request("GET", port, "/call-conversions/vega-embed.js")
    assert status == 401

    context = playwright_api.new_context(viewport={"width": 1440, "height": 1000})
    # Nothing may leave the machine: the chart's script comes from the page's own app.
    elsewhere = []

    def only_here(route):
        host = urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:", "about:")):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_here)
    page = context.new_page()
    try:
        # A browser without a login lands on Airflow's login form, and after signing in, back on the page.
        page.goto(f"{base_url}/call-conversions/?account={ACCOUNT}")
        expect(page.locator("input[name=password]")).to_be_visible(timeout=UI_TIMEOUT_MS)
        assert "/auth/login" in page.url and ACCOUNT not in page.locator("body").inner_text()
        page.locator("input[name=username]").fill(ADMIN_USER)
        page.locator("input[name=password]").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{base_url}/call-conversions/?account={ACCOUNT}", timeout=UI_TIMEOUT_MS)
        expect(page.locator(f"#chart-{ACCOUNT}[data-drawn=true] svg")).to_be_visible(timeout=UI_TIMEOUT_MS)

        # The import DAG's trigger form lists its Params by their titles.
        page.goto(f"{base_url}/dags/{DAG_ID}")
        page.get_by_role("button", name="Trigger").first.click()
        form = page.get_by_role("dialog")
        expect(form).to_contain_text("Run Parameters", timeout=UI_TIMEOUT_MS)
        expect(form).to_contain_text("Read the CRM files again")
        expect(form).to_contain_text("Dry run")
        expect(form).to_contain_text("Validate the upload with Google")
        page.screenshot(path=str(ARTIFACTS / "trigger_form.png"))
        page.keyboard.press("Escape")
        expect(form).to_be_hidden(timeout=UI_TIMEOUT_MS)

        # The rerun's form: titled fields, and the accounts as a multi-select of the configured ones.
        page.goto(f"{base_url}/dags/{RERUN_DAG_ID}")
        page.get_by_role("button", name="Trigger").first.click()
        form = page.get_by_role("dialog")
        expect(form).to_contain_text("Run Parameters", timeout=UI_TIMEOUT_MS)
        for title in ("First day", "Last day", "Accounts", "Dry run", "Match again", "Read the CRM files again"):
            expect(form).to_contain_text(title)
        accounts = form.get_by_role("group").filter(has_text="Accounts to rerun")
        picker = accounts.get_by_role("combobox", name="Select one or multiple values")
        expect(picker).to_be_visible()
        # Both configured accounts are chosen to start with, as chips of the multi-select.
        expect(accounts).to_contain_text(ACCOUNT)
        expect(accounts).to_contain_text(SPARE_ACCOUNT)
        page.screenshot(path=str(ARTIFACTS / "rerun_trigger_form.png"))
        page.keyboard.press("Escape")

        # The page is on the navigation bar and opens inside the Airflow UI.
        page.goto(f"{base_url}/dags/{DAG_ID}")
        page.get_by_role("link", name="Call conversions").click()
        page.wait_for_url(f"{base_url}/plugin/call-conversions**", timeout=UI_TIMEOUT_MS)
        frame = page.frame_locator("iframe[title='Call conversions']")
        section = frame.locator(f"section#account-{ACCOUNT}")
        chart = section.locator(f"#chart-{ACCOUNT}[data-drawn=true]")
        expect(chart.locator("svg")).to_be_visible(timeout=UI_TIMEOUT_MS)
        expect(chart.locator("svg g[class*='uploaded_bars'] path")).to_have_count(len(days))
        expect(chart.locator("svg g[class*='rate_points'] path")).to_have_count(len(days))
        labels = chart.element_handle().evaluate(X_AXIS_LABELS)
        assert labels[-1][2] == f"{today:%d %b}", labels  # the last day of the window (today) is named
        for (_, right, text), (left, _, after) in zip(labels, labels[1:], strict=False):
            assert right <= left, f"x-axis labels {text!r} and {after!r} overlap: {labels}"
        for day, want in expected.items():
            row = section.locator(f'tr[data-day="{day:%Y-%m-%d}"]')
            for column in ("read", "matched", "match_rate", "uploaded"):
                expect(row.locator(f'td[data-col="{column}"]')).to_have_text(want[column])
            expect(row.locator("td.runs")).to_contain_text(want["run_id"])
        # Each day's state, from Airflow: both real runs are queued; the others are not in Airflow's database.
        state = {day: section.locator(f'tr[data-day="{day:%Y-%m-%d}"] td[data-col="state"]') for day in days}
        expect(state[days[0]]).to_have_attribute("data-state", "running")
        expect(state[days[1]]).to_have_attribute("data-state", "running")
        expect(state[days[2]]).to_have_text("–")
        codes = section.locator("table.ledger-codes")
        expect(codes.locator('tr[data-state="parked"][data-code="TOO_RECENT_CALL"] td').nth(2)).to_have_text("2")
        expect(codes.locator('tr[data-state="failed"][data-code="EXPIRED_EVENT"] td').nth(2)).to_have_text("1")
        expect(section.locator("table.ledger-recent")).to_contain_text("555000111")
        expect(frame.locator(f"section#account-{SPARE_ACCOUNT}")).to_contain_text("No runs in this period")
        expect(section.locator(".tiles")).to_contain_text("conflicts")
        expect(section.locator("table.days th")).to_contain_text(["Conflicts"])
        page.screenshot(path=str(ARTIFACTS / "call_conversions_in_airflow_ui.png"))
        html = section.inner_html()
        assert PHONE not in html and PHONE[3:] not in html and "too recent" not in html
        assert "abababab" not in html and "cdcdcdcd" not in html  # no part of a key (an HMAC of the number)

        # A DAG-run link opens the run in the Airflow UI (the whole window, not the frame).
        section.locator(f'tr[data-day="{days[0]:%Y-%m-%d}"] td.runs a').first.click()
        page.wait_for_url(f"{base_url}/dags/{DAG_ID}/runs/{quote(linked_run_id, safe='')}", timeout=UI_TIMEOUT_MS)
        expect(page.get_by_text(linked_run_id).first).to_be_visible(timeout=UI_TIMEOUT_MS)

        # A day rerun by the rerun DAG links to that DAG's run, which exists.
        page.goto(f"{base_url}/call-conversions/?account={ACCOUNT}")
        rerun_link = page.locator(f'tr[data-day="{days[1]:%Y-%m-%d}"] td.runs a').first
        assert rerun_link.get_attribute("href") == f"/dags/{RERUN_DAG_ID}/runs/{quote(rerun_id, safe='')}"
        status, _, text = request(
            "GET",
            port,
            f"/api/v2/dags/{RERUN_DAG_ID}/dagRuns/{quote(rerun_id, safe='')}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert status == 200, (status, text[:300])
        rerun_link.click()
        page.wait_for_url(f"{base_url}/dags/{RERUN_DAG_ID}/runs/{quote(rerun_id, safe='')}", timeout=UI_TIMEOUT_MS)
        expect(page.get_by_text(rerun_id).first).to_be_visible(timeout=UI_TIMEOUT_MS)

        # The page on its own, full length, for a person to look at.
        page.goto(f"{base_url}/call-conversions/?account={ACCOUNT}")
        expect(page.locator(f"#chart-{ACCOUNT}[data-drawn=true] svg")).to_be_visible(timeout=UI_TIMEOUT_MS)
        assert PHONE[3:] not in page.content()
        page.screenshot(path=str(ARTIFACTS / "call_conversions_page.png"), full_page=True)
        assert elsewhere == [], f"the page asked for something off this machine: {elsewhere}"
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
        log = ARTIFACTS / "api-server.log"
        print(f"screenshot: {ARTIFACTS / 'failure.png'}; api-server log tail:\n{log.read_text()[-3000:]}")
        raise
    finally:
        context.close()
