# The two commands a newcomer needs:  make demo   and   make test
# Both create .venv and install what is missing on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATE ?= 2026-11-27

export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export CALL_CONVERSIONS_WAREHOUSE_URL ?= sqlite:///$(CURDIR)/var/warehouse.db
export AIRFLOW_CONN_CALL_CONVERSIONS_WAREHOUSE ?= {"conn_type": "generic", "extra": {"sqlalchemy_url": "$(CALL_CONVERSIONS_WAREHOUSE_URL)"}}

.PHONY: install demo ui-demo test lint airflow migrate clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

migrate: $(STAMP)
	$(BIN)/python -m callconv.warehouse migrate

demo: $(STAMP)
	@mkdir -p var $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/db-migrate.log; exit 1)
	$(BIN)/python -m callconv.demo run --date $(DEMO_DATE) --warehouse-url "$(CALL_CONVERSIONS_WAREHOUSE_URL)" \
		|| (tail -40 var/demo-run.log; exit 1)

lint: $(STAMP)
	$(BIN)/ruff check .

# Two workers, a test file each at a time: each worker has its own warehouse schema and Airflow
# home (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# Airflow for trying the project in a browser, under the FAB auth manager (standalone would force
# the simple one, where every user is an admin): callconv.local_airflow migrates, makes the admin
# user (password in $(AIRFLOW_HOME)/admin-password) and each account's access_role, then starts
# the api-server, scheduler, dag-processor and triggerer. AIRFLOW__API__PORT=8090 make airflow
# moves the UI; the task runner then reaches the execution API on that port too. Conversion and
# sale keys are HMACs under the pseudonym keyring: unless its connection is set, one kept in var/.
airflow: export AIRFLOW__API__PORT ?= 8080
airflow: export AIRFLOW__CORE__EXECUTION_API_SERVER_URL ?= http://localhost:$(AIRFLOW__API__PORT)/execution/
airflow: $(STAMP)
	@mkdir -p var $(AIRFLOW_HOME)
	export AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM="$${AIRFLOW_CONN_CALL_CONVERSIONS_PSEUDONYM:-$$($(BIN)/python \
		-m callconv.protection.pseudonyms local-connection --file var/pseudonym-keyring.json)}" \
		&& $(BIN)/python -m callconv.warehouse migrate \
		&& $(BIN)/python -m callconv.local_airflow --port $(AIRFLOW__API__PORT)

# The demo day in the Airflow UI: seeds it for each account, starts the sandboxes (Google Ads, and
# Data Manager for an account that delivers through it) and Airflow (as make airflow) with the
# connections set, runs each account's day through the scheduler (real task logs) and waits for Ctrl-C.
# The logic is in callconv/demo_ui.py; AIRFLOW__API__PORT=8090 make ui-demo moves the UI. `exec`:
# on Ctrl-C make waits for the demo itself, which stops Airflow and the sandboxes before it exits.
ui-demo: export AIRFLOW__API__PORT ?= 8080
ui-demo: export AIRFLOW__CORE__EXECUTION_API_SERVER_URL ?= http://localhost:$(AIRFLOW__API__PORT)/execution/
ui-demo: UI_DEMO_VAR ?= $(CURDIR)/var
ui-demo: $(STAMP)
	@mkdir -p $(UI_DEMO_VAR) $(AIRFLOW_HOME)
	PATH="$(abspath $(BIN)):$$PATH" exec $(BIN)/python -m callconv.demo ui --date $(DEMO_DATE) \
		--warehouse-url "$(CALL_CONVERSIONS_WAREHOUSE_URL)" --var-dir "$(UI_DEMO_VAR)"

clean:
	rm -rf var $(AIRFLOW_HOME)
