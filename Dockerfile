# The Airflow image for docker-compose.yaml: the official image plus the
# project's pinned requirements and the callconv package.
#
# Keep the tag in step with the apache-airflow pin in requirements.txt and
# constraints.txt, and the Python version with pyproject.toml
# (tests/unit/test_compose.py checks both).
FROM apache/airflow:3.3.2-python3.11

# The base image runs as the "airflow" user (uid 50000, group 0); pip must run as
# that user, never as root. Files are owned by group 0 so that any AIRFLOW_UID
# chosen in docker-compose.yaml can read them.
WORKDIR /opt/airflow

# Requirements first, so that code changes do not reinstall every dependency.
# constraints.txt pins apache-airflow==3.3.2 itself, the same as the base image,
# so pip keeps the image's Airflow.
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/
RUN pip install --no-cache-dir -r /opt/airflow/requirements.txt -c /opt/airflow/constraints.txt \
    && python -c "import os; from importlib.metadata import version as v; \
assert v('apache-airflow') == os.environ['AIRFLOW_VERSION'], 'pip replaced the image Airflow'"

# The pipeline package, installed in editable mode from /opt/airflow/include:
# docker-compose.yaml mounts ./include there, so the containers run the code on
# the host without a rebuild. callconv.config takes /opt/airflow as the project
# root, so relative paths in config/call_conversions.yaml (var/...) land in
# /opt/airflow/var.
COPY --chown=airflow:0 pyproject.toml /opt/airflow/
COPY --chown=airflow:0 include/ /opt/airflow/include/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow \
    && python -c "import callconv.config"

ENV PYTHONPATH=/opt/airflow/include \
    CALL_CONVERSIONS_CONFIG=/opt/airflow/config/call_conversions.yaml

# DAGs, plugins and config are not baked in: docker-compose.yaml mounts them.
