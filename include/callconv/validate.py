"""Stage 2: validate one CRM extract with Great Expectations Core, built in code.

The input is one extract already renamed to our canonical columns, every value
a string (or missing), indexed by source row number. Validation has two steps:

1. Table checks (GX suite ``callconv_extract_table``): the required columns are
   present and the row count is within ``[min_rows, max_rows]``. A failure
   raises :class:`ExtractRejected` before any row is looked at. An empty extract
   is never rejected: on a day that expects data it becomes a warning.
2. Row checks (GX suite ``callconv_extract_rows``, ``result_format="COMPLETE"``):
   every failing expectation's ``unexpected_index_list`` gives the source rows,
   each expectation carries one reason code (see :data:`REASON_CODES`). When the
   share of failing rows is above ``max_bad_row_share`` the extract is rejected,
   otherwise the failing rows are reported for quarantine.

GX never sees a phone number: it validates a frame in which ``caller_phone`` is
reduced to a presence flag, so neither the Data Docs nor a validation result
can contain one. Values are compared after trimming whitespace (currencies also
upper-cased, as normalisation does); times and values are read by the
normalisation stage's own parsers (see :mod:`callconv.validate_prepare`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from callconv.currencies import ISO_4217
from callconv.validate_prepare import (
    OPTIONAL_COLUMNS,
    PHONE_PRESENT,
    REQUIRED_COLUMNS,
    prepare_row_frame,
    prepare_table_frame,
)

if TYPE_CHECKING:
    from callconv.config import ValidationRules

log = logging.getLogger(__name__)

# Reason codes, in the order they are listed for a row.
PHONE_MISSING = "phone_missing"
TIME_MISSING = "time_missing"
TIME_UNPARSEABLE = "time_unparseable"
VALUE_UNPARSEABLE = "value_unparseable"
VALUE_NEGATIVE = "value_negative"
CURRENCY_UNKNOWN = "currency_unknown"
OUTCOME_UNKNOWN = "outcome_unknown"
DUPLICATE_CRM_ID = "duplicate_crm_id"
REASON_CODES = (
    PHONE_MISSING,
    TIME_MISSING,
    TIME_UNPARSEABLE,
    VALUE_UNPARSEABLE,
    VALUE_NEGATIVE,
    CURRENCY_UNKNOWN,
    OUTCOME_UNKNOWN,
    DUPLICATE_CRM_ID,
)
_REASON_ORDER = {reason: position for position, reason in enumerate(REASON_CODES)}

TABLE_SUITE = "callconv_extract_table"
ROW_SUITE = "callconv_extract_rows"
_SITE_NAME = "callconv_run"
_REASON_KEY = "callconv_reason"


class ExtractRejected(Exception):
    """The extract as a whole is unusable; the message says why, without row contents.

    ``kind`` is ``missing_columns``, ``too_few_rows``, ``too_many_rows`` or
    ``too_many_bad_rows`` when raised here (``rejected`` when not given), and
    ``report`` is set for ``too_many_bad_rows``.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "rejected",
        report: ValidationReport | None = None,
        data_docs_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.report = report
        self.data_docs_path = data_docs_path


@dataclass(frozen=True)
class ValidationReport:
    row_count: int
    row_reasons: dict[int, list[str]]  # source row -> reason codes, failing rows only
    reason_counts: dict[str, int]  # reason -> number of rows with it
    bad_row_share: float
    warnings: list[str] = field(default_factory=list)
    data_docs_path: str | None = None  # index.html of this run's Data Docs

    @property
    def bad_row_count(self) -> int:
        return len(self.row_reasons)

    def good_rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``frame`` (indexed by source row) that passed every row check."""
        return frame.loc[~frame.index.isin(list(self.row_reasons))]


def validate_extract(
    frame: pd.DataFrame,
    known_outcomes: set[str],
    decimal: str,
    rules: ValidationRules,
    data_docs_dir: Path | None = None,
    run_name: str = "run",
) -> ValidationReport:
    """Validate one extract; raise :class:`ExtractRejected` if it must not be used at all.

    ``rules`` is a :class:`callconv.config.ValidationRules` (or anything with
    ``min_rows``, ``max_rows``, ``max_bad_row_share`` and ``expect_data``).
    With ``data_docs_dir`` set, GX Data Docs for this run are written there, also
    when the extract is rejected (the exception then carries ``data_docs_path``).
    """
    if decimal not in (".", ","):
        raise ValueError(f"decimal separator must be '.' or ',', got {decimal!r}")
    if not frame.index.is_unique:
        raise ValueError("the extract's index must be unique source row numbers")

    runner = _GxRunner(data_docs_dir, run_name)

    # 1. Table checks, on a frame with the canonical columns and rows but no values.
    table = runner.validate(TABLE_SUITE, _table_expectations(rules), prepare_table_frame(frame))
    columns_result = _tagged(table, _COLUMNS_CHECK)
    if not columns_result.success:
        missing = sorted(columns_result.result["details"]["mismatched"].get("missing", []))
        runner.reject(
            f"required column(s) missing from the extract: {', '.join(missing)} "
            f"(required: {', '.join(REQUIRED_COLUMNS)})",
            kind="missing_columns",
        )
    row_count = int(_tagged(table, _ROW_COUNT_CHECK).result["observed_value"])
    warnings: list[str] = []
    if row_count == 0:
        if rules.expect_data:
            warnings.append("the extract is empty, but this day expects data")
            log.warning("extract %s is empty on a day that expects data", run_name)
    elif row_count < rules.min_rows:
        runner.reject(
            f"the extract has {row_count} rows, fewer than the minimum of {rules.min_rows}",
            kind="too_few_rows",
        )
    elif row_count > rules.max_rows:
        runner.reject(
            f"the extract has {row_count} rows, more than the maximum of {rules.max_rows}",
            kind="too_many_rows",
        )

    # 2. Row checks.
    present = [column for column in OPTIONAL_COLUMNS if column in frame.columns]
    rows = runner.validate(
        ROW_SUITE,
        _row_expectations(present, known_outcomes, decimal),
        prepare_row_frame(frame, decimal),
    )
    row_reasons: dict[int, list[str]] = {}
    for result in rows:
        if result.success:
            continue
        reason = result.expectation_config.meta[_REASON_KEY]
        for row in result.result["unexpected_index_list"]:
            row_reasons.setdefault(int(row), []).append(reason)
    row_reasons = {
        row: sorted(set(reasons), key=_REASON_ORDER.__getitem__) for row, reasons in sorted(row_reasons.items())
    }
    counts = {reason: 0 for reason in REASON_CODES}
    for reasons in row_reasons.values():
        for reason in reasons:
            counts[reason] += 1
    reason_counts = {reason: count for reason, count in counts.items() if count}
    bad_share = len(row_reasons) / row_count if row_count else 0.0

    report = ValidationReport(
        row_count=row_count,
        row_reasons=row_reasons,
        reason_counts=reason_counts,
        bad_row_share=bad_share,
        warnings=warnings,
        data_docs_path=runner.build_docs(),
    )
    by_reason = _counts_text(reason_counts)
    log.info(
        "validated %d rows: %d failed (%.1f%%)%s",
        row_count,
        len(row_reasons),
        bad_share * 100,
        f"; by reason: {by_reason}" if by_reason else "",
    )
    if bad_share > rules.max_bad_row_share:
        raise ExtractRejected(
            f"{bad_share:.1%} of rows failed validation ({len(row_reasons)} of {row_count}), "
            f"above the {rules.max_bad_row_share:.1%} limit; by reason: {by_reason}",
            kind="too_many_bad_rows",
            report=report,
            data_docs_path=report.data_docs_path,
        )
    return report


def _counts_text(reason_counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in reason_counts.items())


def _raised(info: dict | None) -> bool:
    """Whether GX caught an exception: flat ``{"raised_exception": ...}`` or one per metric."""
    if not info:
        return False
    if info.get("raised_exception"):
        return True
    return any(
        (value.get("raised_exception") if isinstance(value, dict) else getattr(value, "raised_exception", False))
        for value in info.values()
    )


def _tagged(results: list, tag: str) -> Any:
    return next(result for result in results if result.expectation_config.meta[_REASON_KEY] == tag)


# --- expectations -------------------------------------------------------------------------

_COLUMNS_CHECK = "required_columns"
_ROW_COUNT_CHECK = "row_count"


def _table_expectations(rules: ValidationRules) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(REQUIRED_COLUMNS),
            exact_match=False,
            meta={_REASON_KEY: _COLUMNS_CHECK},
            notes="The extract is rejected when a required column is missing.",
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=rules.min_rows,
            max_value=rules.max_rows,
            meta={_REASON_KEY: _ROW_COUNT_CHECK},
            notes=(
                "A non-empty extract outside these bounds is rejected; an empty one only "
                "raises a warning when the day expects data."
            ),
        ),
    ]


def _row_expectations(present: list[str], known_outcomes: set[str], decimal: str) -> list:
    import great_expectations.expectations as gxe

    def tagged(reason: str, rule: str) -> dict:
        # The description replaces GX's generated sentence in the Data Docs, so it
        # states the rule and the reason code a failing row gets.
        return {"meta": {_REASON_KEY: reason}, "description": f"{rule} (else: {reason})"}

    expectations = [
        gxe.ExpectColumnValuesToBeInSet(
            column="caller_phone",
            value_set=[PHONE_PRESENT],
            **tagged(PHONE_MISSING, "the caller's phone number must not be blank; numbers are never shown here"),
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="conversion_time", **tagged(TIME_MISSING, "the conversion time must not be blank")
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="conversion_time_unparseable",
            **tagged(
                TIME_UNPARSEABLE,
                "the conversion time must read as a date and time, year first; unreadable ones are listed",
            ),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="outcome",
            value_set=sorted(known_outcomes),
            **tagged(OUTCOME_UNKNOWN, "the outcome must be one mapped to a conversion action"),
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="outcome", **tagged(OUTCOME_UNKNOWN, "the outcome must not be blank")),
    ]
    if "value" in present:
        expectations += [
            gxe.ExpectColumnValuesToBeNull(
                column="value_unparseable",
                **tagged(
                    VALUE_UNPARSEABLE,
                    f"the value, when given, must be an amount written with decimal separator '{decimal}'",
                ),
            ),
            gxe.ExpectColumnValuesToBeNull(
                column="value_negative",
                **tagged(VALUE_NEGATIVE, "the value, when given, must not be negative"),
            ),
        ]
    if "currency" in present:
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="currency",
                value_set=sorted(ISO_4217),
                **tagged(CURRENCY_UNKNOWN, "the currency, when given, must be an ISO 4217 code"),
            )
        )
    if "crm_id" in present:
        expectations.append(
            gxe.ExpectColumnValuesToBeNull(
                column="crm_id_repeat",
                **tagged(
                    DUPLICATE_CRM_ID,
                    "a CRM id must not repeat one on an earlier row (the first row keeps it)",
                ),
            )
        )
    return expectations


# --- Great Expectations plumbing ----------------------------------------------------------


def _quiet_gx() -> None:
    """GX logs chatty INFO lines (some at import); keep it at WARNING unless configured."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


class _GxRunner:
    """One ephemeral GX context per extract, with an optional Data Docs site on disk."""

    def __init__(self, data_docs_dir: Path | None, run_name: str) -> None:
        _quiet_gx()
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self._gx = gx
        self._docs_dir = Path(data_docs_dir).resolve() if data_docs_dir is not None else None
        sites = {}
        if self._docs_dir is not None:
            sites[_SITE_NAME] = {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(self._docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites=sites,
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        )
        self._context = gx.get_context(mode="ephemeral", project_config=config)
        asset = self._context.data_sources.add_pandas("crm").add_dataframe_asset("extract")
        self._batch = asset.add_batch_definition_whole_dataframe("whole_extract")
        from great_expectations.core.run_identifier import RunIdentifier

        self._run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
        self._docs_path: str | None = None

    def validate(self, suite_name: str, expectations: list, frame: pd.DataFrame) -> list:
        """Run one suite on ``frame``; the expectation results, each tagged in its meta."""
        gx = self._gx
        suite = self._context.suites.add(gx.ExpectationSuite(name=suite_name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = self._context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite_name}_{uuid.uuid4().hex[:8]}", data=self._batch, suite=suite)
        )
        outcome = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE"},
            run_id=self._run_id,
        )
        for result in outcome.results:
            if _raised(result.exception_info):
                # A check that cannot run is our bug, not bad data. Say which one; the
                # exception text is left out as it could quote values.
                config = result.expectation_config
                raise RuntimeError(
                    f"GX could not evaluate {config.type} on {config.kwargs.get('column', 'the table')} "
                    f"(suite {suite_name}); see the Great Expectations debug log"
                )
        return list(outcome.results)

    def build_docs(self) -> str | None:
        if self._docs_dir is None:
            return None
        if self._docs_path is None:
            self._docs_dir.mkdir(parents=True, exist_ok=True)
            self._context.build_data_docs(site_names=[_SITE_NAME])
            index = self._docs_dir / "index.html"
            self._docs_path = str(index) if index.is_file() else None
        return self._docs_path

    def reject(self, message: str, *, kind: str) -> None:
        docs = self.build_docs()
        log.warning("extract rejected (%s): %s", kind, message)
        raise ExtractRejected(message, kind=kind, data_docs_path=docs)


__all__ = [
    "REASON_CODES",
    "ExtractRejected",
    "ValidationReport",
    "validate_extract",
]
