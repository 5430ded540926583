"""A "Call conversions" page in the Airflow UI, behind Airflow's own login.

For each account and account-local day: the day's state (failed, running or
done, from Airflow's own runs), rows read, quarantined by reason, matched,
unmatched by reason, match rate, and what the upload sent (uploaded, already
existed, parked, failed), conflicts; a chart of the match rate and uploaded
conversions over the last 90 days; the parked and failed conversions by error
code; links to the DAG runs, each in its own DAG. No phone number, caller hash
or Google error message is ever put on the page.

The HTML comes from the Jinja2 templates in ``call_conversions_templates/``
beside this file, with autoescaping. The chart is a Vega-Lite spec built with
altair and drawn in the browser by vega-embed; the app serves that script
itself (``/call-conversions/vega-embed.js``, from the pinned vl-convert-python),
so the page fetches nothing from the internet.

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
config; the days' states come from the api-server's own Airflow database.
Airflow's API modules, SQLAlchemy, Jinja2, altair and the project's modules are
imported inside the request handlers, so loading this plugin in a scheduler or
worker costs next to nothing.
"""

# No "from __future__ import annotations": FastAPI reads the handlers' annotations at run
# time, and they name classes imported inside create_app().
import logging
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
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
            data = load_page_data(
                settings.warehouse_conn_id,
                shown,
                last_day,
                days,
                airflow_runs=lambda first, last: load_airflow_runs(shown, timezones, first, last),
            )
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

    @app.get(f"/{VEGA_SCRIPT}")
    def vega_script(user=Depends(authenticated_user), v: str | None = Query(default=None, max_length=16)):
        """The chart's JavaScript, from the installed vl-convert-python; cached by the browser per version."""
        from fastapi.responses import Response

        return Response(
            vega_bundle(_vega_version()),
            media_type="text/javascript",
            headers={"Cache-Control": "private, max-age=604800"},
        )

    return app


def permitted_accounts(user, account_ids: list[str]) -> list[str]:
    """The accounts whose import DAG's runs the user may read, per Airflow's auth manager."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    from callconv.monitoring.report_queries import import_dag_id

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


def load_page_data(conn_id: str, account_ids: list[str], last_day: date, days: int, airflow_runs=None) -> dict:
    """The page's data: the warehouse's counts, with each day's state from ``airflow_runs(first, last)``.

    ``airflow_runs`` reads the runs from Airflow's database (:func:`load_airflow_runs`); if it
    fails, the page shows the counts and says that the days' states could not be read.
    """
    from callconv.monitoring import report_queries as q

    first_day, last_day = q.default_window(last_day, days)
    engine = warehouse_engine(conn_id)
    with engine.connect() as connection:
        summaries = q.daily_summaries(connection, account_ids, first_day, last_day)
        code_counts = q.ledger_problem_counts(connection, account_ids)
        problems = q.recent_ledger_problems(connection, account_ids, limit=RECENT_PROBLEMS)
    states_unavailable = False
    runs = []
    if airflow_runs is not None:
        try:
            runs = airflow_runs(first_day, last_day)
        except Exception:  # noqa: BLE001 - the counts are still worth showing; details in the log
            log.exception("call-conversions page: Airflow's runs could not be read")
            states_unavailable = True
    summaries = q.apply_airflow_runs(summaries, runs, account_ids, first_day, last_day)
    return {
        "first_day": first_day,
        "last_day": last_day,
        "states_unavailable": states_unavailable,
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


# ------------------------------------------------------------------ Airflow's runs


def load_airflow_runs(account_ids: list[str], timezones: dict, first_day: date, last_day: date) -> list:
    """The runs of the accounts' import DAGs and of the rerun DAG that may cover days in the window.

    Read from Airflow's own database (the api-server's session), with each run's task states,
    for :func:`callconv.monitoring.report_queries.apply_airflow_runs`.
    """
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    from callconv.monitoring import report_queries as q

    # A day's window starts at most 14 hours before its UTC midnight, and ends at most 14 after.
    since = datetime.combine(first_day - timedelta(days=1), time(0), tzinfo=UTC)
    until = datetime.combine(last_day + timedelta(days=2), time(0), tzinfo=UTC)
    import_dags = [q.import_dag_id(account_id) for account_id in account_ids]
    zones = {account_id: timezones[account_id] for account_id in account_ids}
    with create_session() as session:
        rows = session.execute(
            sa.select(
                DagRun.dag_id,
                DagRun.run_id,
                DagRun.state,
                DagRun.start_date,
                DagRun.queued_at,
                DagRun.created_at,
                DagRun.run_after,
                DagRun.data_interval_start,
                DagRun.conf,
            ).where(
                sa.or_(
                    sa.and_(
                        DagRun.dag_id.in_(import_dags),
                        DagRun.data_interval_start >= since,
                        DagRun.data_interval_start < until,
                    ),
                    # A rerun covers days before it was triggered.
                    sa.and_(DagRun.dag_id == q.RERUN_DAG_ID, DagRun.run_after >= since),
                )
            )
        ).all()
        runs = {}
        for row in rows:
            covers = q.days_covered(row.dag_id, row.data_interval_start, row.conf, zones)
            if covers:
                runs[(row.dag_id, row.run_id)] = (row, covers)
        tasks: dict[tuple[str, str], list] = {key: [] for key in runs}
        if runs:
            for ti in session.execute(
                sa.select(
                    TaskInstance.dag_id,
                    TaskInstance.run_id,
                    TaskInstance.task_id,
                    TaskInstance.state,
                    # The label as rendered ("<account> <day>"), not the property's fallback to the index.
                    TaskInstance.__table__.c.rendered_map_index.label("label"),
                ).where(
                    TaskInstance.dag_id.in_({dag_id for dag_id, _ in runs}),
                    TaskInstance.run_id.in_({run_id for _, run_id in runs}),
                )
            ):
                if (ti.dag_id, ti.run_id) in tasks:
                    tasks[(ti.dag_id, ti.run_id)].append(
                        q.TaskState(
                            task_id=ti.task_id.rsplit(".", 1)[-1],
                            state=str(ti.state) if ti.state is not None else None,
                            label=ti.label,
                        )
                    )
    return [
        q.AirflowRun(
            dag_id=row.dag_id,
            run_id=row.run_id,
            state=str(row.state),
            started=row.start_date or row.queued_at or row.created_at or row.run_after,
            covers=covers,
            tasks=tuple(tasks[key]),
        )
        for key, (row, covers) in runs.items()
    ]


# ------------------------------------------------------------------ the page, from Jinja2 templates

TEMPLATES = Path(__file__).resolve().parent / "call_conversions_templates"
# Served by this app, so the browser fetches no script from the internet.
VEGA_SCRIPT = "vega-embed.js"


@lru_cache(maxsize=1)
def _templates():
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(("html",), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(number=_number, percent=_percent, when=_when)
    environment.globals.update(run_href=_run_href)
    return environment


def _run_href(root: str, dag_id: str | None, run_id: str, account_id: str) -> str:
    """A run's page in the Airflow UI; a run whose DAG is unknown is taken for the account's import DAG."""
    from callconv.monitoring.report_queries import import_dag_id

    dag_id = dag_id or import_dag_id(account_id)
    return f"{root}dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f}%"


def _number(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _when(moment: datetime | None) -> str:
    return "–" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _error_page(message: str) -> str:
    return _templates().get_template("error.html").render(title=PAGE_TITLE, message=message)


def render_page(data: dict, all_accounts: list[str], selected: str | None, root: str = "/") -> str:
    """The whole page as HTML; the templates escape every value from the warehouse or from Airflow."""
    page_href = f"{root}{URL_PREFIX.strip('/')}/"
    nav = []
    if len(all_accounts) > 1:
        nav = [{"label": "all accounts", "href": page_href, "current": not selected}] + [
            {
                "label": account_id,
                "href": f"{page_href}?{urlencode({'account': account_id})}",
                "current": account_id == selected,
            }
            for account_id in all_accounts
        ]
    accounts = [
        {
            **account,
            "dag_href": f"{root}dags/{quote(account['dag_id'], safe='')}",
            "tiles": _tiles(account["days"]),
            "chart_spec": chart_spec(account["chart"], account["id"]),
            "chart_has_data": any(p.uploaded is not None or p.match_rate is not None for p in account["chart"]),
            # The DAG of each run id the days know, for the ledger's "last run" links.
            "run_dags": {run.run_id: run.dag_id for day in account["days"] for run in day.runs if run.dag_id},
        }
        for account in data["accounts"]
    ]
    return (
        _templates()
        .get_template("page.html")
        .render(
            title=PAGE_TITLE,
            root=root,
            first_day=data["first_day"],
            last_day=data["last_day"],
            states_unavailable=data.get("states_unavailable", False),
            nav=nav,
            accounts=accounts,
            vega_script=f"{page_href}{VEGA_SCRIPT}?v={quote(_vega_version())}",
        )
    )


def _tiles(days) -> list[tuple[str, str]]:
    sales = sum(d.sales or 0 for d in days)
    matched = sum(d.matched or 0 for d in days)
    return [
        ("days with runs", _number(len(days))),
        ("days failed", _number(sum(1 for d in days if d.state and d.state.state == "failed"))),
        ("rows read", _number(sum(d.read for d in days))),
        ("quarantined", _number(sum(d.quarantined_total for d in days))),
        ("matched", _number(matched)),
        ("match rate", _percent(matched / sales if sales else None)),
        ("uploaded", _number(sum(d.uploaded for d in days))),
        ("parked", _number(sum(d.parked_total for d in days))),
        ("failed", _number(sum(d.failed_total for d in days))),
        ("conflicts", _number(sum(d.conflicts_total for d in days))),
    ]


# ------------------------------------------------------------------ the chart (Vega-Lite, through altair)

BAR_COLOUR, RATE_COLOUR = "#3b73b9", "#d9480f"
# The marks' names; Vega puts "<name>_marks" on each mark's SVG group.
BARS, RATE_LINE, RATE_POINTS = "uploaded_bars", "rate_line", "rate_points"


def label_days(first: date, last: date) -> list[date]:
    """The days the x axis names: evenly spaced, counted back from the last day, which is always named.

    Every day up to two weeks, then every 7th, 14th or 28th day, so no two named days are closer
    than the rest (the last day does not crowd the one before it).
    """
    n = (last - first).days + 1
    step = next(step for limit, step in ((14, 1), (45, 7), (120, 14), (10**6, 28)) if n <= limit)
    return sorted(last - timedelta(days=back) for back in range(0, n, step))


def chart_spec(points, account_id: str, height: int = 260) -> dict:
    """Uploaded conversions (bars, left axis) and match rate (line and points, right axis), one band per day.

    A Vega-Lite spec as a dict, for vega-embed in the browser. Each day is a band named by its
    ISO date, so no time zone shifts a bar; the line breaks where a day has no match result; the
    axis names the days of :func:`label_days`, and Vega leaves out any label that would still
    overlap another on a narrow screen.
    """
    import altair as alt

    values = [
        {"day": point.day.isoformat(), "uploaded": point.uploaded, "match_rate": point.match_rate} for point in points
    ]
    named = [day.isoformat() for day in label_days(points[0].day, points[-1].day)]
    day = alt.X(
        "day:O",
        title=None,
        # Every day of the window in order, with or without a value (a layer drops its empty days).
        scale=alt.Scale(domain=[value["day"] for value in values], paddingInner=0.15, paddingOuter=0.1),
        axis=alt.Axis(
            values=named,
            labelExpr="utcFormat(toDate(datum.value), '%d %b')",
            labelAngle=0,
            labelOverlap="greedy",
            labelFlush=True,
            grid=False,
        ),
    )
    tooltip = [
        alt.Tooltip("day:O", title="Day"),
        alt.Tooltip("uploaded:Q", title="Uploaded", format=","),
        alt.Tooltip("match_rate:Q", title="Match rate", format=".1%"),
    ]
    base = alt.Chart(alt.Data(values=values))
    bars = (
        base.mark_bar(color=BAR_COLOUR, opacity=0.8)
        .encode(
            x=day,
            y=alt.Y(
                "uploaded:Q",
                title="Uploaded conversions",
                # About four whole-number steps, the top one labelled: the domain is niced to the ticks.
                scale=alt.Scale(nice=4),
                axis=alt.Axis(titleColor=BAR_COLOUR, format=",d", tickMinStep=1, tickCount=4),
            ),
            tooltip=tooltip,
        )
        .properties(name=BARS)
    )
    rate = alt.Y(
        "match_rate:Q",
        title="Match rate",
        scale=alt.Scale(domain=[0, 1]),
        axis=alt.Axis(orient="right", format="%", titleColor=RATE_COLOUR, grid=False),
    )
    line = base.mark_line(color=RATE_COLOUR, strokeWidth=2, invalid="break-paths-show-domains").properties(
        name=RATE_LINE
    )
    dots = base.mark_circle(color=RATE_COLOUR, size=36, opacity=1).encode(tooltip=tooltip).properties(name=RATE_POINTS)
    chart = (
        alt.layer(bars, alt.layer(line, dots).encode(x=day, y=rate))
        .resolve_scale(y="independent")
        .properties(
            width="container",
            height=height,
            description=f"Uploaded conversions and match rate per day for {account_id}",
        )
        .configure_view(stroke="#d9e2ec")
    )
    return chart.to_dict()


def _vega_version() -> str:
    """The Vega-Lite version that altair writes specs for, as vl-convert names it (v6_4)."""
    import altair as alt

    return "_".join(alt.SCHEMA_VERSION.split(".")[:2])


@lru_cache(maxsize=2)
def vega_bundle(vl_version: str) -> str:
    """Vega, Vega-Lite and vega-embed in one script, from the pinned vl-convert-python (no network)."""
    import vl_convert

    return vl_convert.javascript_bundle(vl_version=vl_version)


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
