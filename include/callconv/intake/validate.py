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

A large extract is validated in chunks (:class:`ExtractValidator`): the table
checks once, on the whole file's columns and row count, the row checks chunk by
chunk, each chunk a run of its own in the Data Docs.

GX never sees a phone number: it validates a frame in which ``caller_phone`` is
reduced to a presence flag, so neither the Data Docs nor a validation result
can contain one. The Data Docs do show sample values of other columns, so GX
renders them into a private temporary folder and every file is stored
encrypted (:func:`callconv.protection.storage.store_tree`). Values are compared after
trimming whitespace (currencies also upper-cased, as normalisation does); times and values are read by the
normalisation stage's own parsers (see :mod:`callconv.intake.validate_prepare`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from callconv.intake.currencies import ISO_4217
from callconv.intake.validate_prepare import (
    CANONICAL_COLUMNS,
    CRM_ID_MAX_LENGTH,
    OPTIONAL_COLUMNS,
    PHONE_PRESENT,
    REQUIRED_COLUMNS,
    clean_text,
    prepare_row_frame,
)

if TYPE_CHECKING:
    from callconv.config import ValidationRules
    from callconv.protection.storage import Area, Sealer

log = logging.getLogger(__name__)

# Reason codes, in the order they are listed for a row.
PHONE_MISSING = "phone_missing"
TIME_MISSING = "time_missing"
TIME_UNPARSEABLE = "time_unparseable"
TIME_OUT_OF_RANGE = "time_out_of_range"
VALUE_UNPARSEABLE = "value_unparseable"
VALUE_NEGATIVE = "value_negative"
CURRENCY_UNKNOWN = "currency_unknown"
OUTCOME_UNKNOWN = "outcome_unknown"
DUPLICATE_CRM_ID = "duplicate_crm_id"
CRM_ID_TOO_LONG = "crm_id_too_long"
NUL_BYTE = "nul_byte"
REASON_CODES = (
    PHONE_MISSING,
    TIME_MISSING,
    TIME_UNPARSEABLE,
    TIME_OUT_OF_RANGE,
    VALUE_UNPARSEABLE,
    VALUE_NEGATIVE,
    CURRENCY_UNKNOWN,
    OUTCOME_UNKNOWN,
    DUPLICATE_CRM_ID,
    CRM_ID_TOO_LONG,
    NUL_BYTE,
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
    sealer: Sealer | None = None,
    docs_area: Area | None = None,
) -> ValidationReport:
    """Validate one extract held whole; raise :class:`ExtractRejected` if it must not be used at all.

    ``rules`` is a :class:`callconv.config.ValidationRules` (or anything with
    ``min_rows``, ``max_rows``, ``max_bad_row_share`` and ``expect_data``).
    With ``data_docs_dir`` set, GX Data Docs for this run are stored there (sealed with
    ``sealer`` as files of ``docs_area``, see :func:`callconv.protection.storage.store`), also when the extract is
    rejected (the exception then carries ``data_docs_path``). The intake validates
    chunk by chunk with :class:`ExtractValidator` instead.
    """
    if decimal not in (".", ","):
        raise ValueError(f"decimal separator must be '.' or ',', got {decimal!r}")
    if not frame.index.is_unique:
        raise ValueError("the extract's index must be unique source row numbers")
    with ExtractValidator(known_outcomes, decimal, rules, data_docs_dir, run_name, sealer, docs_area) as validator:
        validator.check_table(list(frame.columns), len(frame))
        row_reasons = validator.check_rows(frame)
        report = replace(validator.finish(), row_reasons=row_reasons)
    if report.bad_row_share > rules.max_bad_row_share:
        raise ExtractRejected(
            f"{report.bad_row_share:.1%} of rows failed validation ({report.bad_row_count} of {report.row_count}), "
            f"above the {rules.max_bad_row_share:.1%} limit; by reason: {_counts_text(report.reason_counts)}",
            kind="too_many_bad_rows",
            report=report,
            data_docs_path=report.data_docs_path,
        )
    return report


class ExtractValidator:
    """Validates one extract that may be read in chunks: the table checks once, the row checks per chunk.

    Use it as a context manager. :meth:`check_table` takes the whole file's columns and row
    count, :meth:`check_rows` each chunk (indexed by source row), and :meth:`finish` gives a
    :class:`ValidationReport` with the counts over all chunks (its ``row_reasons`` left empty,
    as each chunk's were handed back) and stores the Data Docs. A CRM id repeating one of an
    earlier chunk is a ``duplicate_crm_id`` as within a chunk; earlier ids are remembered as
    64-bit hashes, 8 bytes a row.
    """

    def __init__(
        self,
        known_outcomes: set[str],
        decimal: str,
        rules: ValidationRules,
        data_docs_dir=None,
        run_name: str = "run",
        sealer: Sealer | None = None,
        docs_area: Area | None = None,
    ) -> None:
        if decimal not in (".", ","):
            raise ValueError(f"decimal separator must be '.' or ',', got {decimal!r}")
        self._known_outcomes = known_outcomes
        self._decimal = decimal
        self._rules = rules
        self._run_name = run_name
        self._runner = _GxRunner(data_docs_dir, run_name, sealer, docs_area)
        self._row_count = 0
        self._warnings: list[str] = []
        self._counts = {reason: 0 for reason in REASON_CODES}
        self._bad_rows = 0
        self._earlier_ids = np.empty(0, dtype=np.uint64)

    def seal_within(self, connection) -> None:
        """Advance the Data Docs' generations in ``connection``'s transaction (the intake's), not one of
        their own: on SQLite that transaction holds the only write lock until it commits."""
        self._runner.seal_within(connection)

    def __enter__(self) -> ExtractValidator:
        return self

    def __exit__(self, *exc_info) -> None:
        self._runner.close()

    def check_table(self, columns: list[str], row_count: int) -> None:
        """Required columns and the row count bounds; raises :class:`ExtractRejected`."""
        rules = self._rules
        present = [column for column in CANONICAL_COLUMNS if column in columns]
        # the columns and the number of rows, one byte a cell: enough for table checks
        shape = pd.DataFrame(np.zeros((row_count, len(present)), dtype=bool), columns=present)
        table = self._runner.validate(TABLE_SUITE, _table_expectations(rules), shape)
        columns_result = _tagged(table, _COLUMNS_CHECK)
        if not columns_result.success:
            missing = sorted(columns_result.result["details"]["mismatched"].get("missing", []))
            self._runner.reject(
                f"required column(s) missing from the extract: {', '.join(missing)} "
                f"(required: {', '.join(REQUIRED_COLUMNS)})",
                kind="missing_columns",
            )
        self._row_count = row_count = int(_tagged(table, _ROW_COUNT_CHECK).result["observed_value"])
        if row_count == 0:
            if rules.expect_data:
                self._warnings.append("the extract is empty, but this day expects data")
                log.warning("extract %s is empty on a day that expects data", self._run_name)
        elif row_count < rules.min_rows:
            self._runner.reject(
                f"the extract has {row_count} rows, fewer than the minimum of {rules.min_rows}",
                kind="too_few_rows",
            )
        elif row_count > rules.max_rows:
            self._runner.reject(
                f"the extract has {row_count} rows, more than the maximum of {rules.max_rows}",
                kind="too_many_rows",
            )

    def check_rows(self, chunk: pd.DataFrame, part: str | None = None) -> dict[int, list[str]]:
        """The chunk's failing rows: source row -> reason codes. ``part`` names the chunk in the Data Docs."""
        if not chunk.index.is_unique:
            raise ValueError("the extract's index must be unique source row numbers")
        present = [column for column in OPTIONAL_COLUMNS if column in chunk.columns]
        prepared = prepare_row_frame(chunk, self._decimal)
        if "crm_id" in chunk.columns:
            self._mark_ids_seen_in_earlier_chunks(chunk["crm_id"], prepared)
        results = self._runner.validate(
            ROW_SUITE,
            _row_expectations(present, self._known_outcomes, self._decimal),
            prepared,
            part=part,
        )
        row_reasons: dict[int, list[str]] = {}
        for result in results:
            if result.success:
                continue
            reason = result.expectation_config.meta[_REASON_KEY]
            for row in result.result["unexpected_index_list"]:
                row_reasons.setdefault(int(row), []).append(reason)
        row_reasons = {
            row: sorted(set(reasons), key=_REASON_ORDER.__getitem__) for row, reasons in sorted(row_reasons.items())
        }
        for reasons in row_reasons.values():
            for reason in reasons:
                self._counts[reason] += 1
        self._bad_rows += len(row_reasons)
        return row_reasons

    def _mark_ids_seen_in_earlier_chunks(self, crm_ids: pd.Series, prepared: pd.DataFrame) -> None:
        ids = clean_text(crm_ids)
        given = ids.notna().to_numpy()
        hashes = pd.util.hash_array(ids.fillna("").to_numpy(dtype=object))
        earlier = given & np.isin(hashes, self._earlier_ids)
        if earlier.any():
            prepared["crm_id_repeat"] = prepared["crm_id_repeat"].where(~earlier, ids)
        self._earlier_ids = np.union1d(self._earlier_ids, hashes[given])

    def finish(self) -> ValidationReport:
        """The counts over every chunk checked, with the Data Docs stored; logged as one line."""
        reason_counts = {reason: count for reason, count in self._counts.items() if count}
        row_count = self._row_count
        bad_share = self._bad_rows / row_count if row_count else 0.0
        report = ValidationReport(
            row_count=row_count,
            row_reasons={},
            reason_counts=reason_counts,
            bad_row_share=bad_share,
            warnings=list(self._warnings),
            data_docs_path=self._runner.build_docs(),
        )
        by_reason = _counts_text(reason_counts)
        log.info(
            "validated %d rows: %d failed (%.1f%%)%s",
            row_count,
            self._bad_rows,
            bad_share * 100,
            f"; by reason: {by_reason}" if by_reason else "",
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
        gxe.ExpectColumnValuesToBeNull(
            column="conversion_time_out_of_range",
            **tagged(
                TIME_OUT_OF_RANGE,
                "the conversion time must lie between the years 1900 and 2199; others are listed",
            ),
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="nul_byte",
            **tagged(NUL_BYTE, "no cell may hold a NUL character; the columns that do are listed"),
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
                    "a CRM id must not repeat one on an earlier row with other content (the first row keeps "
                    "it; the intake drops an identical copy before validation)",
                ),
            )
        )
        expectations.append(
            gxe.ExpectColumnValuesToBeNull(
                column="crm_id_too_long",
                **tagged(
                    CRM_ID_TOO_LONG,
                    f"a CRM id must be at most {CRM_ID_MAX_LENGTH} characters; the lengths of longer ones are listed",
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
    """One ephemeral GX context per extract, with an optional Data Docs site.

    GX renders the site into a private temporary folder; :meth:`build_docs` then stores
    every file of it under ``data_docs_dir`` through :func:`callconv.protection.storage.store_tree`
    (sealed when there is a sealer, bound to ``docs_area``), so the Data Docs, which show
    sample values, are never stored in plaintext. :meth:`close` removes the temporary folder.
    """

    def __init__(self, data_docs_dir, run_name: str, sealer: Sealer | None = None, docs_area: Area | None = None):
        _quiet_gx()
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self._gx = gx
        self._docs_dir = Path(data_docs_dir) if isinstance(data_docs_dir, str) else data_docs_dir
        if sealer is not None and data_docs_dir is not None and docs_area is None:
            raise ValueError("sealed Data Docs need the docs area they belong to (account and class)")
        self._sealer, self._docs_area = sealer, docs_area
        self._render_dir = Path(tempfile.mkdtemp(prefix="callconv-docs-")) if data_docs_dir is not None else None
        sites = {}
        if self._render_dir is not None:
            sites[_SITE_NAME] = {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(self._render_dir),
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

        self._run_identifier = RunIdentifier
        self._run_name = run_name
        self._run_time = datetime.now(UTC)
        self._definitions: dict[str, Any] = {}
        self._docs_path: str | None = None

    def validate(self, suite_name: str, expectations: list, frame: pd.DataFrame, part: str | None = None) -> list:
        """Run one suite on ``frame``; the expectation results, each tagged in its meta.

        A suite is set up on its first use; later calls (the next chunk) run it again, as a
        run named after ``part`` so each chunk keeps its own page in the Data Docs.
        """
        gx = self._gx
        definition = self._definitions.get(suite_name)
        if definition is None:
            suite = self._context.suites.add(gx.ExpectationSuite(name=suite_name))
            for expectation in expectations:
                suite.add_expectation(expectation)
            definition = self._context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{suite_name}_{uuid.uuid4().hex[:8]}", data=self._batch, suite=suite)
            )
            self._definitions[suite_name] = definition
        run_name = f"{self._run_name}_{part}" if part else self._run_name
        outcome = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE"},
            run_id=self._run_identifier(run_name=run_name, run_time=self._run_time),
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
        """Render the site and store it under the Data Docs folder; the path of its index page."""
        if self._render_dir is None:
            return None
        if self._docs_path is None:
            from callconv.protection.storage import Area, store_tree, stored_name

            self._context.build_data_docs(site_names=[_SITE_NAME])
            if not (self._render_dir / "index.html").is_file():
                return None
            if self._docs_area is None:  # plaintext docs in a folder of their own
                area, folder = Area(self._docs_dir.parent, self._docs_dir.name, "docs"), "."
            else:
                area, folder = self._docs_area, self._docs_area.logical(self._docs_dir)
            store_tree(self._render_dir, area, folder, self._sealer)
            self._docs_path = str(self._docs_dir / stored_name("index.html", self._sealer))
        return self._docs_path

    def seal_within(self, connection) -> None:
        if self._sealer is not None:
            self._sealer = self._sealer.within(connection)

    def reject(self, message: str, *, kind: str) -> None:
        docs = self.build_docs()
        log.warning("extract rejected (%s): %s", kind, message)
        raise ExtractRejected(message, kind=kind, data_docs_path=docs)

    def close(self) -> None:
        if self._render_dir is not None:
            shutil.rmtree(self._render_dir, ignore_errors=True)


__all__ = [
    "REASON_CODES",
    "ExtractRejected",
    "ExtractValidator",
    "ValidationReport",
    "validate_extract",
]
