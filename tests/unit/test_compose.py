"""docker-compose.yaml, Dockerfile and .dockerignore: checked without Docker.

The compose file is parsed with PyYAML (which resolves the ``<<`` merge keys the
way Compose does) and its ``${VAR:-default}`` references are interpolated here,
so the checks see what ``docker compose config`` would produce, both with the
dev defaults and with values a user puts in ``.env``.

No compose-spec JSON schema ships with this repository or the venv, and tests
never download anything, so ``COMPOSE_SUBSET_SCHEMA`` below is a small
structural schema for the keys this project uses, validated with jsonschema.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from sqlalchemy.engine import make_url

from callconv.runtime import warehouse_url_from_connection

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROJECT_CONFIG = ROOT / "config" / "call_conversions.yaml"

AIRFLOW_HOME = "/opt/airflow"
INFRA_SERVICES = {"postgres", "warehouse", "redis"}
AIRFLOW_COMMANDS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
AIRFLOW_SERVICES = set(AIRFLOW_COMMANDS) | {"airflow-init"}
PROJECT_FOLDERS = ("dags", "plugins", "include", "config")

# What a user might put in .env: every value differs from its default.
CUSTOM_ENV = {
    "AIRFLOW_UID": "1234",
    "AIRFLOW_DB_PASSWORD": "meta-pass",
    "AIRFLOW_FERNET_KEY": "8Ngcgp8wFLgRfdPkKR8Z3LdF3AB9wqe6TLUJ5OVRBq8=",
    "AIRFLOW_JWT_SECRET": "custom-jwt-secret-custom-jwt-secret-0001",
    "AIRFLOW_API_SECRET_KEY": "custom-api-secret-custom-api-secret-0001",
    "AIRFLOW_ADMIN_USERNAME": "ops",
    "AIRFLOW_ADMIN_PASSWORD": "ops-pass",
    "WAREHOUSE_DB_USER": "wh_user",
    "WAREHOUSE_DB_PASSWORD": "wh-pass",
    "WAREHOUSE_DB_NAME": "wh_db",
    "AIRFLOW_API_PORT": "18080",
    "WAREHOUSE_PORT": "15433",
}
ENVIRONMENTS = pytest.mark.parametrize("host_env", [{}, CUSTOM_ENV], ids=["defaults", "custom-env"])


# --- Compose interpolation -------------------------------------------------------

_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate_text(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}."""

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op, arg = env.get(name), match["op"], match["arg"]
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return arg if unset else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return value
        if op in (":+", "+"):
            present = value is not None and (op == "+" or value != "")
            return arg if present else ""
        return value or ""

    result = _REFERENCE.sub(replace, text)
    leftover = _REFERENCE.sub("", text)
    assert "$" not in leftover, f"malformed variable reference in {text!r}"
    return result


def interpolate(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


@cache
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(raw_compose(), env or {})


def services(env: dict[str, str] | None = None) -> dict[str, dict]:
    return compose(env)["services"]


def common(env: dict[str, str] | None = None) -> dict:
    return compose(env)["x-airflow-common"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict (Compose accepts a mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_text(service: dict) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) for each short-syntax or long-syntax volume."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((volume.get("source", ""), volume["target"]))
        else:
            source, target = volume.split(":")[:2]
            mounts.append((source, target))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def host_path_of(container_path: str, service: dict) -> Path:
    """The host path behind a container path, through the service's bind mounts."""
    for source, target in sorted(volume_mounts(service), key=lambda mount: -len(mount[1])):
        if is_bind(source) and (container_path == target or container_path.startswith(target + "/")):
            return (ROOT / source / container_path[len(target) :].lstrip("/")).resolve()
    raise AssertionError(f"{container_path} is not inside any bind mount")


def published_ports(service: dict) -> list[tuple[str, str, str]]:
    """(host_ip, host_port, container_port) for each short-syntax port."""
    ports = []
    for port in service.get("ports", []):
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        host_port = parts[-2] if len(parts) >= 2 else ""
        ports.append((host_ip, host_port, parts[-1]))
    return ports


def project_config() -> dict:
    return yaml.safe_load(PROJECT_CONFIG.read_text())


# --- Services --------------------------------------------------------------------


def test_required_services_exist():
    assert set(services()) >= INFRA_SERVICES | AIRFLOW_SERVICES


def test_infrastructure_images():
    svc = services()
    assert svc["postgres"]["image"] == "postgres:16"
    assert svc["warehouse"]["image"] == "postgres:16"
    assert svc["redis"]["image"].split(":")[0] == "redis"
    assert svc["redis"]["image"].split(":")[1].startswith("7")


@pytest.mark.parametrize("name", sorted(AIRFLOW_COMMANDS))
def test_airflow_service_runs_its_component(name):
    assert command_text(services()[name]) == AIRFLOW_COMMANDS[name]


@ENVIRONMENTS
@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES))
def test_airflow_services_share_image_build_env_and_mounts(name, host_env):
    base, service = common(host_env), services(host_env)[name]
    assert base["build"] == "." and (ROOT / "Dockerfile").is_file()
    assert service["build"] == base["build"]
    assert service["image"] == base["image"]
    # Same value for every common variable: a JWT secret or Fernet key that differs
    # between components breaks task execution or decryption.
    common_env, service_env = environment(base), environment(service)
    assert {key: service_env.get(key) for key in common_env} == common_env
    assert volume_mounts(service) == volume_mounts(base)
    if name != "airflow-init":
        assert service["user"] == base["user"] == f"{host_env.get('AIRFLOW_UID', '50000')}:0"


def test_only_airflow_services_use_the_project_image():
    base = common()
    users = {name for name, service in services().items() if service.get("image") == base["image"]}
    assert users == AIRFLOW_SERVICES
    assert not any("build" in services()[name] for name in INFRA_SERVICES)


# --- Executor, broker and databases ---------------------------------------------


def postgres_credentials(service: dict) -> tuple[str, str, str]:
    env = environment(service)
    return env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]


@ENVIRONMENTS
def test_celery_executor_with_redis_broker_and_postgres_backends(host_env):
    svc, env = services(host_env), environment(common(host_env))
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"

    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert broker.scheme == "redis"
    assert broker.hostname == "redis" and svc["redis"]["image"].startswith("redis:")
    assert (broker.port or 6379) == 6379

    user, password, database = postgres_credentials(svc["postgres"])
    for key, driver in (
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql+psycopg2"),
        ("AIRFLOW__CELERY__RESULT_BACKEND", "db+postgresql"),
    ):
        url = make_url(env[key].removeprefix("db+"))
        assert env[key].startswith(driver + "://"), key
        assert (url.host, url.port or 5432) == ("postgres", 5432), key
        assert (url.username, url.password, url.database) == (user, password, database), key


def warehouse_connection(env: dict[str, str]) -> dict:
    conn_id = project_config()["warehouse_conn_id"]
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    assert variable in env, f"{variable} (warehouse_conn_id {conn_id!r} in {PROJECT_CONFIG.name}) is not set"
    return json.loads(env[variable])


@ENVIRONMENTS
def test_warehouse_connection_points_at_the_warehouse_service(host_env):
    svc, env = services(host_env), environment(common(host_env))
    conn = warehouse_connection(env)
    assert conn["conn_type"] == "postgres"
    assert conn["host"] == "warehouse" and conn["host"] in svc
    assert conn["host"] != make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).host
    assert int(conn.get("port", 5432)) == 5432
    assert (conn["login"], conn["password"], conn["schema"]) == postgres_credentials(svc["warehouse"])
    assert postgres_credentials(svc["warehouse"]) != postgres_credentials(svc["postgres"])


@ENVIRONMENTS
def test_migration_url_is_the_connection_the_tasks_use(host_env):
    """airflow-init migrates CALL_CONVERSIONS_WAREHOUSE_URL; the tasks open the connection."""
    env = environment(common(host_env))
    conn = warehouse_connection(env)
    as_airflow_sees_it = SimpleNamespace(
        conn_id="call_conversions_warehouse",
        conn_type=conn["conn_type"],
        host=conn.get("host"),
        port=conn.get("port"),
        login=conn.get("login"),
        password=conn.get("password"),
        schema=conn.get("schema"),
        extra_dejson=conn.get("extra") or {},
    )
    task_url = make_url(warehouse_url_from_connection(as_airflow_sees_it))
    migration_url = make_url(env["CALL_CONVERSIONS_WAREHOUSE_URL"])
    assert migration_url.set(port=migration_url.port or 5432) == task_url.set(port=task_url.port or 5432)
    assert task_url.host == "warehouse"


# --- Dependencies, volumes, mounts ----------------------------------------------


def test_every_depends_on_names_a_defined_service_with_a_valid_condition():
    svc = services()
    for name, service in svc.items():
        depends_on = service.get("depends_on") or {}
        for dependency, spec in depends_on.items() if isinstance(depends_on, dict) else []:
            assert dependency in svc, f"{name} depends on undefined service {dependency}"
            assert dependency != name
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in svc[dependency], f"{name} waits for {dependency} to be healthy: no healthcheck"
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
        for dependency in depends_on if isinstance(depends_on, list) else []:
            assert dependency in svc, f"{name} depends on undefined service {dependency}"


def test_airflow_services_wait_for_the_databases_and_for_init():
    svc = services()
    for name in AIRFLOW_SERVICES:
        depends_on = svc[name]["depends_on"]
        for infra in INFRA_SERVICES:
            assert depends_on[infra]["condition"] == "service_healthy", (name, infra)
        if name != "airflow-init":
            assert depends_on["airflow-init"]["condition"] == "service_completed_successfully", name
    assert svc["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == "service_healthy"
    assert "depends_on" not in svc["warehouse"] and "depends_on" not in svc["postgres"]


def test_every_named_volume_is_declared_and_used():
    document = compose()
    declared = set(document.get("volumes") or {})
    used = {
        source
        for service in document["services"].values()
        for source, _target in volume_mounts(service)
        if source and not is_bind(source)
    }
    assert used <= declared, f"undeclared volumes: {sorted(used - declared)}"
    assert declared <= used, f"declared but unused volumes: {sorted(declared - used)}"
    # Each database keeps its data in a volume of its own.
    data = "/var/lib/postgresql/data"
    metadata_volume = dict((t, s) for s, t in volume_mounts(document["services"]["postgres"]))[data]
    warehouse_volume = dict((t, s) for s, t in volume_mounts(document["services"]["warehouse"]))[data]
    assert metadata_volume in declared and warehouse_volume in declared and metadata_volume != warehouse_volume


@pytest.mark.parametrize("folder", PROJECT_FOLDERS)
def test_project_folders_are_mounted_from_the_repository(folder):
    mounts = volume_mounts(common())
    assert (f"./{folder}", f"{AIRFLOW_HOME}/{folder}") in mounts
    host = ROOT / folder
    if folder == "plugins" and not host.exists():
        # git keeps no empty folder, so a fresh clone may lack plugins/; Docker creates it.
        return
    assert host.is_dir(), f"{folder}/ is mounted but missing from the repository"


def test_mounted_project_folders_hold_what_the_containers_need():
    service = common()
    assert any(host_path_of(f"{AIRFLOW_HOME}/dags", service).glob("*.py"))
    assert (host_path_of(f"{AIRFLOW_HOME}/include", service) / "callconv" / "warehouse.py").is_file()
    assert (host_path_of(f"{AIRFLOW_HOME}/include", service) / "callconv" / "migrations" / "env.py").is_file()


def test_container_paths_of_the_pipeline_resolve_to_the_project():
    service, env = common(), environment(common())
    # callconv.config takes the folder above the package's parent as the project root.
    include = env["PYTHONPATH"]
    assert include == f"{AIRFLOW_HOME}/include"
    assert (host_path_of(include, service) / "callconv" / "config.py").is_file()
    container_root = str(Path(include).parent)
    assert container_root == AIRFLOW_HOME

    assert host_path_of(env["CALL_CONVERSIONS_CONFIG"], service) == PROJECT_CONFIG.resolve()

    # Relative paths in the config (var/...) must land in a mount, shared by all containers.
    config = project_config()
    for uri in (config["export_uri"], config["data_docs_uri"], config["crm_source"]["landing_uri"]):
        if "://" in uri or uri.startswith("/"):
            continue
        container_path = f"{container_root}/{uri}"
        assert any(container_path.startswith(target + "/") for _s, target in volume_mounts(service)), uri


# --- airflow-init ------------------------------------------------------------------


def init_script(env: dict[str, str] | None = None) -> str:
    command = services(env)["airflow-init"]["command"]
    assert isinstance(command, list) and command[0] == "-c"
    return command[1]


def test_init_runs_airflow_and_warehouse_migrations():
    init = services()["airflow-init"]
    assert init["entrypoint"] == "/bin/bash"
    lines = [line.strip() for line in init_script().splitlines()]
    assert "set -euo pipefail" in lines[:3], "a failed step must fail airflow-init"
    assert "airflow db migrate" in lines
    assert "python -m callconv.warehouse migrate" in lines
    assert environment(init)["CALL_CONVERSIONS_WAREHOUSE_URL"].startswith("postgresql+psycopg2://")
    assert "restart" not in init or init["restart"] == "no"


def test_init_script_is_valid_bash():
    script = init_script()
    bash = shutil.which("bash")
    assert bash, "bash is needed to check the airflow-init script"
    checked = subprocess.run([bash, "-n"], input=script, text=True, capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr


@ENVIRONMENTS
def test_ui_login_is_configured_for_the_fab_auth_manager(host_env):
    """FAB, so that an account's access_role is enforced; the admin is a FAB user that airflow-init creates."""
    env = environment(common(host_env))
    init_env = environment(services(host_env)["airflow-init"])
    assert env["AIRFLOW__CORE__AUTH_MANAGER"] == "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
    assert not any(name.startswith("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER") for name in env)
    username = host_env.get("AIRFLOW_ADMIN_USERNAME", "admin")
    assert init_env["AIRFLOW_ADMIN_USERNAME"] == username
    assert init_env["AIRFLOW_ADMIN_PASSWORD"] == host_env.get("AIRFLOW_ADMIN_PASSWORD", "admin")
    assert "airflow users create --role Admin" in init_script()


# --- Ports and health ------------------------------------------------------------


@ENVIRONMENTS
def test_ports_are_published_only_for_the_api_server_and_the_warehouse(host_env):
    svc = services(host_env)
    assert {name for name, service in svc.items() if service.get("ports")} == {"airflow-apiserver", "warehouse"}
    assert published_ports(svc["airflow-apiserver"]) == [
        ("127.0.0.1", host_env.get("AIRFLOW_API_PORT", "8080"), "8080")
    ]
    assert published_ports(svc["warehouse"]) == [("127.0.0.1", host_env.get("WAREHOUSE_PORT", "5433"), "5432")]


@pytest.mark.parametrize("name", ["postgres", "warehouse", "redis", "airflow-apiserver"])
def test_healthchecks_present(name):
    check = services()[name]["healthcheck"]
    assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL")
    assert len(check["test"]) > 1


def test_api_server_healthcheck_uses_the_monitor_endpoint():
    check = " ".join(services()["airflow-apiserver"]["healthcheck"]["test"])
    assert "http://localhost:8080/api/v2/monitor/health" in check


def test_database_healthchecks_check_their_own_database():
    svc = services()
    assert "pg_isready" in " ".join(svc["postgres"]["healthcheck"]["test"])
    # $${...} escapes Compose, so the container's own POSTGRES_* are used.
    assert svc["warehouse"]["healthcheck"]["test"][-1] == 'pg_isready -U "${POSTGRES_USER}" -d "${POSTGRES_DB}"'


# --- Airflow 3 settings and secrets ---------------------------------------------


def test_execution_api_url_points_at_the_api_server():
    env = environment(common())
    url = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "airflow-apiserver", 8080, "/execution/")
    assert "8080" in {container for *_host, container in published_ports(services()["airflow-apiserver"])}
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
    assert env["CALL_CONVERSIONS_CONFIG"] == f"{AIRFLOW_HOME}/config/call_conversions.yaml"


SECRETS = {
    "AIRFLOW__CORE__FERNET_KEY": "AIRFLOW_FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET": "AIRFLOW_JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY": "AIRFLOW_API_SECRET_KEY",
}


@pytest.mark.parametrize("setting", sorted(SECRETS))
def test_secrets_come_from_the_environment_with_usable_dev_defaults(setting):
    raw = environment(raw_compose()["x-airflow-common"])[setting]
    assert re.fullmatch(r"\$\{" + SECRETS[setting] + r":-[^}]+\}", raw), raw
    assert environment(common(CUSTOM_ENV))[setting] == CUSTOM_ENV[SECRETS[setting]]
    default = environment(common())[setting]
    if setting == "AIRFLOW__CORE__FERNET_KEY":
        assert len(base64.urlsafe_b64decode(default)) == 32, "not a Fernet key"
    else:
        assert len(default) >= 32, "HMAC secrets shorter than 32 bytes are rejected as insecure"


def test_database_passwords_come_from_the_environment():
    raw = raw_compose()["services"]
    assert environment(raw["postgres"])["POSTGRES_PASSWORD"] == "${AIRFLOW_DB_PASSWORD:-airflow}"
    assert environment(raw["warehouse"])["POSTGRES_PASSWORD"] == "${WAREHOUSE_DB_PASSWORD:-callconv}"


# --- Dockerfile and build context ----------------------------------------------


def pinned_version(path: Path, package: str) -> str:
    pins = re.findall(rf"^{re.escape(package)}==(\S+)\s*$", path.read_text(), re.M | re.I)
    assert len(pins) == 1, f"{path.name} should pin {package} exactly once, found {pins}"
    return pins[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_base_image_matches_the_pins():
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[0-9.]+)-python(?P<python>3\.\d+)", froms[0])
    assert match, froms[0]
    assert match["airflow"] == pinned_version(ROOT / "requirements.txt", "apache-airflow")
    assert match["airflow"] == pinned_version(ROOT / "constraints.txt", "apache-airflow")
    assert match["python"] == "3.11"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.12"' in pyproject
    assert 'target-version = "py311"' in pyproject


def test_dockerfile_installs_the_pinned_requirements_and_the_package():
    instructions = dockerfile_instructions()
    copied = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    for needed in ("requirements.txt", "constraints.txt", "pyproject.toml", "include/"):
        assert needed in copied, needed
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    assert any(re.search(r"pip install .*-r \S*requirements\.txt -c \S*constraints\.txt", run) for run in runs)
    assert any(re.search(r"pip install .*--no-deps -e ", run) for run in runs)
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "PYTHONPATH=/opt/airflow/include" in env
    # pip must run as the image's airflow user; the official image refuses pip as root.
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert not users or users[-1] not in ("root", "0", "0:0")


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    ignored.discard("")
    assert {".git", ".venv", "var", ".env"} <= ignored
    for needed in ("requirements.txt", "constraints.txt", "pyproject.toml", "include", "Dockerfile"):
        assert needed not in ignored, needed
    assert not any(pattern.startswith("!") for pattern in ignored)


# --- Structure -------------------------------------------------------------------

_STRING_MAP = {
    "type": "object",
    "patternProperties": {".+": {"type": ["string", "number", "boolean", "null"]}},
}
_COMMAND = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_DURATION = {"type": "string", "pattern": r"^(\d+(h|m|s|ms|us))+$"}
_SERVICE_KEYS = (
    "annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs container_name "
    "cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec "
    "depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file "
    "environment expose extends external_links extra_hosts gpus group_add healthcheck hostname image init ipc "
    "isolation label_file labels links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit "
    "models network_mode networks oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_stop "
    "privileged profiles provider pull_policy pull_refresh_after read_only restart runtime scale secrets "
    "security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits "
    "use_api_socket user userns_mode uts volumes volumes_from working_dir"
).split()
_NAME = "^[a-zA-Z0-9._-]+$"

# The part of the compose specification (github.com/compose-spec/compose-spec,
# schema/compose-spec.json) that this project's file exercises; unknown keys fail.
COMPOSE_SUBSET_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["services"],
    "properties": {
        "name": {"type": "string"},
        "services": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {_NAME: {"$ref": "#/definitions/service"}},
            "additionalProperties": False,
        },
        "volumes": {
            "type": "object",
            "patternProperties": {_NAME: {"type": ["object", "null"]}},
            "additionalProperties": False,
        },
        "networks": {"type": "object"},
        "secrets": {"type": "object"},
        "configs": {"type": "object"},
    },
    "patternProperties": {"^x-": {}},
    "additionalProperties": False,
    "definitions": {
        "service": {
            "type": "object",
            "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
            "propertyNames": {"anyOf": [{"enum": _SERVICE_KEYS}, {"pattern": "^x-"}]},
            "properties": {
                "image": {"type": "string", "minLength": 1},
                "build": {
                    "oneOf": [
                        {"type": "string"},
                        {"type": "object", "properties": {"context": {"type": "string"}}},
                    ]
                },
                "command": _COMMAND,
                "entrypoint": _COMMAND,
                "environment": {"oneOf": [_STRING_MAP, {"type": "array", "items": {"type": "string"}}]},
                "user": {"type": "string"},
                "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
                "expose": {"type": "array", "items": {"type": ["string", "number"]}},
                "ports": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {
                        "oneOf": [{"type": "number"}, {"type": "string", "pattern": r"^[0-9.:\[\]a-f]+(/\w+)?$"}]
                    },
                },
                "volumes": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": r"^[^:]+:/[^:]*(:(ro|rw|z|Z))?$"},
                },
                "depends_on": {
                    "type": "object",
                    "patternProperties": {
                        _NAME: {
                            "type": "object",
                            "required": ["condition"],
                            "properties": {
                                "condition": {
                                    "enum": ["service_started", "service_healthy", "service_completed_successfully"]
                                },
                                "restart": {"type": "boolean"},
                                "required": {"type": "boolean"},
                            },
                            "additionalProperties": False,
                        }
                    },
                    "additionalProperties": False,
                },
                "healthcheck": {
                    "type": "object",
                    "required": ["test"],
                    "properties": {
                        "test": {
                            "type": "array",
                            "minItems": 2,
                            "items": [{"enum": ["CMD", "CMD-SHELL"]}],
                            "additionalItems": {"type": "string"},
                        },
                        "interval": _DURATION,
                        "timeout": _DURATION,
                        "start_period": _DURATION,
                        "start_interval": _DURATION,
                        "retries": {"type": "integer", "minimum": 1},
                        "disable": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            },
        }
    },
}


@ENVIRONMENTS
def test_compose_file_matches_the_structural_schema(host_env):
    jsonschema.Draft7Validator.check_schema(COMPOSE_SUBSET_SCHEMA)
    errors = sorted(
        jsonschema.Draft7Validator(COMPOSE_SUBSET_SCHEMA).iter_errors(compose(host_env)),
        key=lambda error: list(error.path),
    )
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "broken",
    [
        {"helthcheck": {"test": ["CMD", "true"]}},
        {"depends_on": {"postgres": {"condition": "service_ready"}}},
        {"restart": "sometimes"},
        {"healthcheck": {"test": ["CMD", "true"], "interval": "10"}},
        {"healthcheck": {"test": ["redis-cli", "ping"]}},
        {"restart": False},
    ],
    ids=["misspelt-key", "bad-condition", "bad-restart", "duration-without-unit", "test-without-cmd", "bare-no"],
)
def test_structural_schema_rejects_common_mistakes(broken):
    document = compose()
    document["services"]["redis"] = {**document["services"]["redis"], **broken}
    assert not jsonschema.Draft7Validator(COMPOSE_SUBSET_SCHEMA).is_valid(document)
