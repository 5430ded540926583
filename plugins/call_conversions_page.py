"""A "Call conversions" page in the Airflow UI, behind Airflow's own login.

For each account and account-local day: rows read, quarantined by reason,
matched, unmatched by reason, match rate, and what the upload sent (uploaded,
already existed, parked, failed); a chart of the match rate and uploaded
conversions over the last 90 days; the parked and failed conversions by error
code; links to the DAG runs. No phone number, caller hash or Google error
message is ever put on the page.

How it plugs in (Airflow 3):

* ``fastapi_apps`` mounts a small FastAPI app at ``/call-conversions`` on the
  api-server. Every request is authenticated with Airflow's
  ``airflow.api_fastapi.core_api.security.get_user`` (the UI's ``_token``
  cookie or a ``Bearer`` token). A browser without a valid login is sent to the
  login page; anything else gets 401. An account is shown only to users who may
  read the runs of its import DAG (``is_authorized_dag(GET, RUN)``), and a user
  who may read none gets 403.
* ``external_views`` puts "Call conversions" on the UI's navigation bar; the UI
  shows the page in a frame at ``/plugin/call-conversions``.

The warehouse is the Airflow connection named by ``warehouse_conn_id`` in the
config. Airflow's API modules, SQLAlchemy and the project's modules are
imported inside the request handlers, so loading this plugin in a scheduler or
worker costs next to nothing.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations at run
# time, and they name classes imported inside create_app().
import html
import logging
from datetime import UTC, date, datetime
from urllib.parse import quote, urlencode, urlsplit

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/call-conversions"
UI_ROUTE = "call-conversions"
PAGE_TITLE = "Call conversions"
MAX_DAYS = 400
RECENT_PROBLEMS = 50


def _root_path() -> str:
    """The path Airflow is served under (``[api] base_url``), ending in a slash."""
    from airflow.configuration import conf

    path = urlsplit(conf.get("api", "base_url", fallback="") or "").path or "/"
    return path if path.endswith("/") else path + "/"


# ------------------------------------------------------------------ the FastAPI app


def create_app():
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title=PAGE_TITLE, docs_url=None, redoc_url=None, openapi_url=None)
    bearer_scheme = HTTPBearer(auto_error=False)

    async def authenticated_user(
        request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
    ):
        """Airflow's own get_user; a browser without a valid login is sent to the login page."""
        from airflow.api_fastapi.core_api.security import get_user

        try:
            return await get_user(request=request, _oauth_token=None, bearer_credentials=bearer)
        except StarletteHTTPException as error:
            if error.status_code in (401, 403) and "text/html" in request.headers.get("accept", ""):
                from airflow.api_fastapi.app import get_auth_manager

                login = get_auth_manager().get_url_login(next_url=str(request.url))
                raise HTTPException(status_code=303, headers={"Location": login}) from None
            raise

    @app.get("/", response_class=HTMLResponse)
    def page(
        user=Depends(authenticated_user),
        account: str | None = Query(default=None, max_length=64),
        days: int = Query(default=90, ge=1, le=MAX_DAYS),
    ) -> HTMLResponse:
        from callconv.config import ConfigError, load_settings

        try:
            settings = load_settings()
        except ConfigError as error:
            return HTMLResponse(_error_page(f"The call-conversion config cannot be read: {error}"), status_code=503)
        configured = [a.id for a in settings.accounts]
        permitted = permitted_accounts(user, configured)
        if not permitted:
            raise HTTPException(status_code=403, detail="You may not read the runs of any call-conversion DAG")
        if account is not None and account not in permitted:
            raise HTTPException(status_code=404, detail="No such account, or you may not see it")
        shown = [account] if account else permitted
        timezones = {a.id: a.tz for a in settings.accounts}
        last_day = max(datetime.now(timezones[a]).date() for a in shown)
        try:
            data = load_page_data(settings.warehouse_conn_id, shown, last_day, days)
        except Exception as error:  # noqa: BLE001 - a page saying so, and the details in the log
            # The queries carry account ids and dates only; Airflow masks the connection's password.
            log.exception("call-conversions page: warehouse connection %r unreadable", settings.warehouse_conn_id)
            return HTMLResponse(
                _error_page(
                    f"The warehouse (Airflow connection {settings.warehouse_conn_id!r}) could not be read: "
                    f"{type(error).__name__}. See the api-server log."
                ),
                status_code=503,
            )
        return HTMLResponse(render_page(data, all_accounts=permitted, selected=account, root=_root_path()))

    return app


def permitted_accounts(user, account_ids: list[str]) -> list[str]:
    """The accounts whose import DAG's runs the user may read, per Airflow's auth manager."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    from callconv.report_queries import import_dag_id

    dag_ids = {account_id: import_dag_id(account_id) for account_id in account_ids}
    teams = DagModel.get_dag_id_to_team_name_mapping(list(dag_ids.values()))
    auth_manager = get_auth_manager()
    return [
        account_id
        for account_id, dag_id in dag_ids.items()
        if auth_manager.is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.RUN,
            details=DagDetails(id=dag_id, team_name=teams.get(dag_id)),
            user=user,
        )
    ]


def warehouse_engine(conn_id: str):
    """The warehouse engine, from the Airflow connection (``airflow.sdk.Connection``, as tasks read it).

    In the api-server that looks in the environment, the secrets backends and the metadata DB.
    """
    from callconv.runtime import warehouse_engine as engine_for_connection

    return engine_for_connection(conn_id)


def load_page_data(conn_id: str, account_ids: list[str], last_day: date, days: int) -> dict:
    from callconv import report_queries as q

    first_day, last_day = q.default_window(last_day, days)
    engine = warehouse_engine(conn_id)
    with engine.connect() as connection:
        summaries = q.daily_summaries(connection, account_ids, first_day, last_day)
        code_counts = q.ledger_problem_counts(connection, account_ids)
        problems = q.recent_ledger_problems(connection, account_ids, limit=RECENT_PROBLEMS)
    return {
        "first_day": first_day,
        "last_day": last_day,
        "accounts": [
            {
                "id": account_id,
                "dag_id": q.import_dag_id(account_id),
                "days": [s for s in summaries if s.account_id == account_id],
                "chart": q.chart_points(summaries, account_id, first_day, last_day),
                "code_counts": [c for c in code_counts if c.account_id == account_id],
                "problems": [p for p in problems if p.account_id == account_id],
            }
            for account_id in account_ids
        ],
    }


# ------------------------------------------------------------------ HTML

_CSS = """
:root { color-scheme: light; --ink:#1f2933; --muted:#52606d; --line:#d9e2ec; --bar:#3b73b9; --rate:#d9480f; }
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 24px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
       "DejaVu Sans", sans-serif; color: var(--ink); background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-top: 12px; border-top: 2px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 6px; }
p.lead, p.note { color: var(--muted); margin: 0 0 8px; }
p.note { font-size: 12px; }
a { color: #1c5fb0; }
nav.accounts a { margin-right: 12px; }
nav.accounts a.current { font-weight: 600; text-decoration: none; color: var(--ink); }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0 14px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; min-width: 110px; }
.tile b { display: block; font-size: 20px; }
.tile span { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 8px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f5f7fa; font-weight: 600; white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
ul.reasons { list-style: none; margin: 0; padding: 0; font-size: 12px; color: var(--muted); white-space: nowrap; }
td:first-child { white-space: nowrap; }
code, .mono { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 12px; }
.runs a { display: block; font-size: 12px; white-space: nowrap; }
.empty { color: var(--muted); font-style: italic; }
figure { margin: 0; overflow-x: auto; }
svg text { font-family: system-ui, "DejaVu Sans", sans-serif; }
"""


# The Airflow UI shows this page in a sandboxed frame that may not navigate the whole window, but
# may reach it (same origin). A link into the Airflow UI is therefore opened by the UI's own router
# (history.pushState + popstate); opened on its own, or if that is refused, a link works as usual.
_OPEN_IN_AIRFLOW_UI = """
document.addEventListener("click", function (event) {
  var link = event.target.closest ? event.target.closest("a[data-airflow-ui]") : null;
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  if (window.top === window) return;
  try {
    var ui = window.top;
    if (ui.location.origin !== window.location.origin) return;
    ui.history.pushState(null, "", link.href);
    ui.dispatchEvent(new PopStateEvent("popstate", { state: null }));
    event.preventDefault();
  } catch (error) {}
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _run_href(root: str, dag_id: str, run_id: str) -> str:
    return f"{root}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _run_link(root: str, dag_id: str, run_id: str) -> str:
    href = _run_href(root, dag_id, run_id)
    return f'<a data-airflow-ui href="{_e(href)}" title="DAG run {_e(run_id)}">{_e(run_id)}</a>'


def _percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f}%"


def _number(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _reasons(counts: dict[str, int]) -> str:
    if not counts:
        return ""
    items = "".join(f"<li>{_e(reason)}: {count:,}</li>" for reason, count in counts.items())
    return f'<ul class="reasons">{items}</ul>'


def _when(moment: datetime | None) -> str:
    return "–" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _error_page(message: str) -> str:
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{PAGE_TITLE}</title>"
        f"<style>{_CSS}</style></head><body><h1>{PAGE_TITLE}</h1><p class=lead>{_e(message)}</p></body></html>"
    )


def render_page(data: dict, all_accounts: list[str], selected: str | None, root: str = "/") -> str:
    """The whole page as HTML; every value from the warehouse is escaped."""
    page_href = f"{root}{URL_PREFIX.strip('/')}/"
    nav = ""
    if len(all_accounts) > 1:
        links = [f'<a class="{"" if selected else "current"}" href="{_e(page_href)}">all accounts</a>']
        for account_id in all_accounts:
            css = "current" if account_id == selected else ""
            href = f"{page_href}?{urlencode({'account': account_id})}"
            links.append(f'<a class="{css}" href="{_e(href)}">{_e(account_id)}</a>')
        nav = f'<nav class="accounts">{"".join(links)}</nav>'
    sections = "".join(_account_section(account, data, root) for account in data["accounts"])
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{PAGE_TITLE}</title><style>{_CSS}</style><script>{_OPEN_IN_AIRFLOW_UI}</script></head><body>"
        f"<h1>{PAGE_TITLE}</h1>"
        f'<p class="lead">Days {data["first_day"]:%Y-%m-%d} to {data["last_day"]:%Y-%m-%d}, per account-local day.</p>'
        f"{nav}{sections}"
        '<p class="note">Read, quarantined, uploaded, already existed, parked and failed add up the day\'s runs '
        "(an upload run sends every due conversion of the account, including parked ones of earlier days); "
        "matched, unmatched and the match rate are from the day's latest run. Dry runs are left out.</p>"
        "</body></html>"
    )


def _account_section(account: dict, data: dict, root: str) -> str:
    account_id, dag_id, days = account["id"], account["dag_id"], account["days"]
    dag_href = f"{root}dags/{quote(dag_id, safe='')}"
    return (
        f'<section class="account" id="account-{_e(account_id)}" data-account="{_e(account_id)}">'
        f'<h2>{_e(account_id)} <small>· <a data-airflow-ui href="{_e(dag_href)}">{_e(dag_id)}</a></small></h2>'
        f"{_tiles(days)}"
        f"<figure>{render_chart(account['chart'], account_id)}</figure>"
        f"<h3>Per day</h3>{_days_table(days, dag_id, root)}"
        f"<h3>Parked and failed conversions</h3>"
        f"{_code_table(account['code_counts'])}{_problem_table(account['problems'], dag_id, root)}"
        "</section>"
    )


def _tiles(days) -> str:
    sales = sum(d.sales or 0 for d in days)
    matched = sum(d.matched or 0 for d in days)
    tiles = [
        ("days with runs", _number(len(days))),
        ("rows read", _number(sum(d.read for d in days))),
        ("quarantined", _number(sum(d.quarantined_total for d in days))),
        ("matched", _number(matched)),
        ("match rate", _percent(matched / sales if sales else None)),
        ("uploaded", _number(sum(d.uploaded for d in days))),
        ("parked", _number(sum(d.parked_total for d in days))),
        ("failed", _number(sum(d.failed_total for d in days))),
        ("conflicts", _number(sum(d.conflicts_total for d in days))),
    ]
    body = "".join(f'<div class="tile"><b>{value}</b><span>{_e(label)}</span></div>' for label, value in tiles)
    return f'<div class="tiles">{body}</div>'


def _days_table(days, dag_id: str, root: str) -> str:
    if not days:
        return '<p class="empty">No runs in this period.</p>'
    head = (
        "<tr><th>Day</th><th class=text>Runs</th><th>Read</th><th>Quarantined</th><th>Matched</th>"
        "<th>Unmatched</th><th>Match rate</th><th>Uploaded</th><th>Already existed</th><th>Parked</th>"
        "<th>Failed</th><th>Conflicts</th></tr>"
    )
    rows = []
    for day in days:
        runs = "".join(_run_link(root, dag_id, run.run_id) for run in day.runs)
        uploaded = day.upload_runs > 0
        rows.append(
            f'<tr data-day="{day.business_date:%Y-%m-%d}">'
            f"<td>{day.business_date:%Y-%m-%d}</td>"
            f'<td class="text runs">{runs}</td>'
            f'<td data-col="read">{_number(day.read)}</td>'
            f'<td data-col="quarantined">{_number(day.quarantined_total)}{_reasons(day.quarantined)}</td>'
            f'<td data-col="matched">{_number(day.matched)}</td>'
            f'<td data-col="unmatched">{_number(day.unmatched_total)}{_reasons(day.unmatched)}</td>'
            f'<td data-col="match_rate">{_percent(day.match_rate)}</td>'
            f'<td data-col="uploaded">{_number(day.uploaded) if uploaded else "–"}</td>'
            f'<td data-col="already_existed">{_number(day.already_existed) if uploaded else "–"}</td>'
            f'<td data-col="parked">{_number(day.parked_total) if uploaded else "–"}{_reasons(day.parked)}</td>'
            f'<td data-col="failed">{_number(day.failed_total) if uploaded else "–"}{_reasons(day.failed)}</td>'
            f'<td data-col="conflicts">{_number(day.conflicts_total)}{_reasons(day.conflicts)}</td>'
            "</tr>"
        )
    return f'<table class="days"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _code_table(counts) -> str:
    if not counts:
        return '<p class="empty">No parked or failed conversions.</p>'
    rows = "".join(
        f'<tr data-state="{_e(c.state)}" data-code="{_e(c.error_code or "")}">'
        f'<td class="text">{_e(c.state)}</td><td class="text"><code>{_e(c.error_code or "–")}</code></td>'
        f"<td>{c.rows:,}</td><td>{c.first_business_date:%Y-%m-%d} to {c.last_business_date:%Y-%m-%d}</td>"
        f"<td>{_when(c.next_park_until)}</td></tr>"
        for c in counts
    )
    return (
        '<table class="ledger-codes"><thead><tr><th class=text>State</th><th class=text>Error code</th>'
        "<th>Conversions</th><th>Business days</th><th>Next retry (park until)</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _problem_table(problems, dag_id: str, root: str) -> str:
    if not problems:
        return ""
    rows = "".join(
        f"<tr><td>{p.business_date:%Y-%m-%d}</td><td class=text>{_e(p.state)}</td>"
        f"<td class=text><code>{_e(p.error_code or '–')}</code></td>"
        f"<td class=text><code>{_e(p.conversion_action_id)}</code></td>"
        f"<td>{_when(p.park_until)}</td><td>{p.attempts}</td>"
        f'<td class="text runs">{_run_link(root, dag_id, p.run_id)}</td></tr>'
        for p in problems
    )
    return (
        f"<h3>Latest {len(problems)} parked or failed conversions</h3>"
        '<table class="ledger-recent"><thead><tr><th>Business day</th><th class=text>State</th>'
        "<th class=text>Error code</th><th class=text>Conversion action</th><th>Park until</th><th>Attempts</th>"
        f"<th class=text>Last run</th></tr></thead><tbody>{rows}</tbody></table>"
    )


# ------------------------------------------------------------------ the chart


def _nice_ceiling(value: int) -> int:
    """The top of the count axis: four equal whole-number steps of a round size, at least value."""
    magnitude = 1
    while True:
        for mantissa in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8):
            step = mantissa * magnitude
            if step == int(step) and 4 * step >= value:
                return int(4 * step)
        magnitude *= 10


def render_chart(points, account_id: str, width: int = 960, height: int = 280) -> str:
    """Uploaded conversions (bars, left axis) and match rate (line, right axis), one slot per day, as SVG."""
    left, right, top, bottom = 52, 56, 34, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(points), 1)
    slot = plot_w / n
    max_uploaded = _nice_ceiling(max((p.uploaded or 0 for p in points), default=0))
    base_y = top + plot_h

    def x_mid(i: int) -> float:
        return left + slot * (i + 0.5)

    def y_count(value: float) -> float:
        return base_y - plot_h * value / max_uploaded

    def y_rate(rate: float) -> float:
        return base_y - plot_h * rate

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="chart-{_e(account_id)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Match rate and uploaded conversions per day for {_e(account_id)}">',
        f"<title>Match rate and uploaded conversions per day, {_e(account_id)}</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfe" stroke="#d9e2ec"/>',
    ]
    # Grid and both axes: four steps each.
    for step in range(5):
        y = base_y - plot_h * step / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e7eb"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#3b73b9">'
            f"{max_uploaded * step // 4:,}</text>"
        )
        parts.append(f'<text x="{left + plot_w + 6}" y="{y + 4:.1f}" font-size="11" fill="#d9480f">{25 * step}%</text>')
    # Bars: uploaded conversions.
    bar_w = max(slot * 0.7, 1)
    for i, point in enumerate(points):
        if point.uploaded:
            y = y_count(point.uploaded)
            parts.append(
                f'<rect class="bar" x="{x_mid(i) - bar_w / 2:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                f'height="{base_y - y:.1f}" fill="#3b73b9" fill-opacity="0.8">'
                f"<title>{point.day:%Y-%m-%d}: {point.uploaded:,} uploaded</title></rect>"
            )
    # Line: match rate, broken where a day has no match result.
    path, pen_down = [], False
    for i, point in enumerate(points):
        if point.match_rate is None:
            pen_down = False
            continue
        path.append(f"{'L' if pen_down else 'M'}{x_mid(i):.1f},{y_rate(point.match_rate):.1f}")
        pen_down = True
    if path:
        parts.append(f'<path class="rate" d="{" ".join(path)}" fill="none" stroke="#d9480f" stroke-width="2"/>')
    for i, point in enumerate(points):
        if point.match_rate is not None:
            parts.append(
                f'<circle class="rate-point" cx="{x_mid(i):.1f}" cy="{y_rate(point.match_rate):.1f}" r="3" '
                f'fill="#d9480f"><title>{point.day:%Y-%m-%d}: {point.match_rate * 100:.1f}% matched</title></circle>'
            )
    # Day labels: about every two weeks, and the last day.
    every = max(1, round(n / 7))
    for i, point in enumerate(points):
        if i % every == 0 or i == n - 1:
            anchor = "end" if i == n - 1 else "middle"
            parts.append(
                f'<text x="{x_mid(i):.1f}" y="{base_y + 16}" text-anchor="{anchor}" font-size="11" fill="#52606d">'
                f"{point.day:%d %b}</text>"
            )
    # Legend.
    parts.append(
        f'<rect x="{left}" y="10" width="12" height="12" fill="#3b73b9" fill-opacity="0.8"/>'
        f'<text x="{left + 18}" y="20" font-size="12" fill="#1f2933">Uploaded conversions (left axis)</text>'
        f'<line x1="{left + 240}" x2="{left + 262}" y1="16" y2="16" stroke="#d9480f" stroke-width="2"/>'
        f'<circle cx="{left + 251}" cy="16" r="3" fill="#d9480f"/>'
        f'<text x="{left + 268}" y="20" font-size="12" fill="#1f2933">Match rate (right axis)</text>'
    )
    if not any(p.uploaded is not None or p.match_rate is not None for p in points):
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle" font-size="14" '
            'fill="#52606d">No runs in this period</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------ the plugin


class CallConversionsPagePlugin(AirflowPlugin):
    name = "call_conversions_page"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": PAGE_TITLE}]
    external_views = [
        {
            "name": PAGE_TITLE,
            "href": f"{_root_path()}{URL_PREFIX.strip('/')}/",
            "url_route": UI_ROUTE,
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
