"""The docker/ files, checked without a Docker engine: compose structure, secrets, images, build context.

What a broken deployment would show only after a long image build (a worker that cannot reach
the Execution API, mismatched JWT secrets, a GPU worker on the wrong queue, an image drifting from
requirements.txt) is pinned here from the files themselves. When a Compose CLI is installed
(`docker compose` or Debian's `docker-compose`), the file is also validated against its schema.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
AIRFLOW_SERVICES = ("airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker", "airflow-worker-gpu")
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(:?[-?])?([^}]*)\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def placeholders(value: str) -> str:
    """Replace each `${NAME...}` with `<NAME>`, so values can be compared and parsed."""
    return VARIABLE.sub(lambda m: f"<{m[1]}>", value)


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def env_example() -> dict[str, str | None]:
    """Keys of .env.example: value for set keys, None for documented-but-commented ones."""
    keys: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.fullmatch(r"(#\s*)?([A-Z_][A-Z0-9_]*)=(.*)", line.strip()):
            keys[match[2]] = None if match[1] else match[3]
    return keys


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    logical = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    pairs = []
    for line in logical.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            pairs.append((keyword.upper(), " ".join(args.split())))
    return pairs


def pip_install(dockerfile: Path) -> list[str]:
    """The words of the RUN line that installs the pinned requirements."""
    [line] = [args for keyword, args in instructions(dockerfile)
              if keyword == "RUN" and "pip install" in args and " -r " in args]
    return line.split()


# --- compose ---------------------------------------------------------------------------------

def test_compose_runs_airflow_celery_workers_postgres_redis_and_an_s3_store(services):
    assert set(services) >= {"postgres", "redis", "seaweedfs", "model-store-init", *AIRFLOW_SERVICES}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"].startswith("redis:")
    commands = {name: services[name]["command"] for name in AIRFLOW_SERVICES if name != "airflow-init"}
    assert commands == {
        "airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
        "airflow-worker": "celery worker", "airflow-worker-gpu": "celery worker -q gpu --concurrency 1",
    }
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_airflow_init_migrates_the_database_and_creates_the_login(services):
    init = services["airflow-init"]
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert placeholders(init["environment"]["_AIRFLOW_WWW_USER_PASSWORD"]) == "<AIRFLOW_ADMIN_PASSWORD>"
    assert "airflow db check-migrations" in init["command"][-1], "a failed migration must fail airflow-init"
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}


def test_gpu_worker_takes_the_gpu_queue_on_a_reserved_nvidia_device(services):
    gpu = services["airflow-worker-gpu"]
    assert re.search(r"(-q|--queues) gpu\b", gpu["command"])
    assert gpu["profiles"] == ["gpu"], "without the profile, hosts with no GPU could not start the stack"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["image"] != services["airflow-worker"]["image"]
    assert "-q" not in services["airflow-worker"]["command"], "the default worker serves the default queue"


def test_all_airflow_services_share_one_jwt_secret_and_reach_the_execution_api(compose, services):
    assert COMPOSE_FILE.read_text().count("AIRFLOW__API_AUTH__JWT_SECRET") == 1, "define it once, in the anchor"
    common = compose["x-airflow-common"]["environment"]
    assert placeholders(common["AIRFLOW__API_AUTH__JWT_SECRET"]) == "<JWT_SECRET>"
    url = common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    assert url == "http://airflow-apiserver:8080/execution/"
    assert any(port.endswith(":8080") for port in services["airflow-apiserver"]["ports"])
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == common["AIRFLOW__API_AUTH__JWT_SECRET"], name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == url, name


def test_model_store_connection_uses_the_s3_service_and_its_credentials(compose, services):
    env = compose["x-airflow-common"]["environment"]
    conn = json.loads(placeholders(env["AIRFLOW_CONN_MODEL_STORE"]))
    assert conn["conn_type"] == "aws"
    store = services["seaweedfs"]
    assert store["image"].startswith("chrislusf/seaweedfs:") and "-s3 -s3.port=8333" in store["command"]
    assert conn["extra"] == {"endpoint_url": "http://seaweedfs:8333", "region_name": "us-east-1"}
    assert placeholders(store["environment"]["AWS_ACCESS_KEY_ID"]) == conn["login"] == "<S3_ACCESS_KEY>"
    assert placeholders(store["environment"]["AWS_SECRET_ACCESS_KEY"]) == conn["password"] == "<S3_SECRET_KEY>"
    # code outside a task (report plugin, bucket set-up) reaches the same store through AWS_*
    assert env["AWS_ENDPOINT_URL"] == conn["extra"]["endpoint_url"]
    assert placeholders(env["AWS_ACCESS_KEY_ID"]) == conn["login"]
    assert placeholders(store["environment"]["WEED_JWT_FILER_SIGNING_KEY"]) == "<S3_SIGNING_KEY>"


def test_pipeline_settings_put_runs_and_models_on_s3_and_route_training_by_env(compose, services):
    env = compose["x-airflow-common"]["environment"]
    assert VARIABLE.fullmatch(env["TLP_RUN_ROOT"])[3] == "s3://tlpipe/runs"
    assert VARIABLE.fullmatch(env["TLP_PUBLISH_URI"])[3] == "s3://models"
    assert VARIABLE.fullmatch(env["TLP_TRAIN_QUEUE"]).group(1, 3) == ("TLP_TRAIN_QUEUE", "default")
    init = services["model-store-init"]
    assert init["environment"]["TLP_RUN_ROOT"] == env["TLP_RUN_ROOT"]
    assert init["environment"]["TLP_PUBLISH_URI"] == env["TLP_PUBLISH_URI"]
    assert "storage.ensure_bucket" in init["command"][-1]
    assert services["airflow-worker"]["depends_on"]["model-store-init"] == {
        "condition": "service_completed_successfully"}


def test_seaweedfs_gets_the_time_to_close_its_stores_when_stopped(services):
    store = services["seaweedfs"]
    assert "-volume.preStopSeconds=0" in store["command"], "one node: nothing to drain before stopping"
    assert int(store["stop_grace_period"].removesuffix("s")) >= 20, "the filer needs 15 s; Docker's default is 10"


def test_dags_and_plugins_are_mounted_from_the_repository(services):
    for name in AIRFLOW_SERVICES:
        mounts = dict(volume.split(":", 1) for volume in services[name]["volumes"])
        assert mounts["../dags"] == "/opt/airflow/dags"
        assert mounts["../plugins"] == "/opt/airflow/plugins"
    assert (DOCKER / "../dags").resolve() == ROOT / "dags" and (ROOT / "dags").is_dir()
    assert (ROOT / "plugins").is_dir()


def test_images_build_from_the_repository_with_existing_dockerfiles(services):
    for name in ("airflow-worker", "airflow-worker-gpu", "model-store-init"):
        build = services[name]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).is_file()


def test_every_compose_variable_is_documented_and_no_secret_is_committed():
    documented = env_example()
    found = list(VARIABLE.finditer(COMPOSE_FILE.read_text()))
    used = {m[1] for m in found}
    assert used <= set(documented), f"document in .env.example: {sorted(used - set(documented))}"
    required = {m[1] for m in found if m[2] == ":?"}
    assert required >= {"JWT_SECRET", "FERNET_KEY", "POSTGRES_PASSWORD", "AIRFLOW_ADMIN_PASSWORD",
                        "S3_SECRET_KEY", "S3_SIGNING_KEY"}
    secrets = required - {"S3_ACCESS_KEY"}
    assert {name: documented[name] for name in secrets} == dict.fromkeys(secrets, ""), \
        ".env.example documents secrets with empty values; real ones go in docker/.env"


# --- compose CLI (schema validation; no engine needed) ---------------------------------------

def compose_cli() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            return command
    return None


def compose_config(tmp_path: Path, drop: str | None = None) -> subprocess.CompletedProcess:
    """`compose config -q` with .env.example's empty values filled in (and one variable dropped)."""
    lines = []
    for name, value in env_example().items():
        if value is not None and name != drop:
            lines.append(f"{name}={value or 'x' + name.lower()}")
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI (apt-get install docker-compose)")
    return subprocess.run([*cli, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "--profile", "gpu",
                           "config", "-q"], capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid_for_the_compose_cli(tmp_path):
    result = compose_config(tmp_path)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_a_secret_and_names_it(tmp_path):
    result = compose_config(tmp_path, drop="JWT_SECRET")
    assert result.returncode != 0
    assert "set JWT_SECRET in docker/.env" in result.stderr


# --- Dockerfiles -----------------------------------------------------------------------------

def test_requirements_pin_exact_versions_only():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._\[\],-]+==[A-Za-z0-9.+!-]+", line), f"pin exactly: {line}"


def test_image_builds_on_the_official_airflow_image_of_the_pinned_version():
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        steps = instructions(dockerfile)
        version = dict(arg.split("=", 1) for keyword, arg in steps if keyword == "ARG" and "=" in arg)[
            "AIRFLOW_VERSION"]
        assert version == requirement_pins()["apache-airflow"]
        [base] = [arg for keyword, arg in steps if keyword == "FROM"]
        assert re.fullmatch(r"apache/airflow:3\.3\.\d+-python3\.11", base.replace("${AIRFLOW_VERSION}", version))


def test_image_installs_the_pinned_requirements_with_the_lock():
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        words = pip_install(dockerfile)
        assert words[:4] == ["pip", "install", "--no-cache-dir", '"apache-airflow==${AIRFLOW_VERSION}"']
        requirements, lock = words[words.index("-r") + 1], words[words.index("-c") + 1]
        copied = [arg.split() for keyword, arg in instructions(dockerfile) if keyword == "COPY"]
        assert [requirements, lock, "./"] in copied, "the pip line must read the files COPY puts there"
        assert (ROOT / requirements).is_file() and (ROOT / lock).is_file()
        extras = [word.strip('"') for word in words[words.index("-c") + 2:]]
        assert extras and all(re.fullmatch(r"[\w.\[\]-]+==[\w.]+", word) for word in extras), extras
        names = {re.sub(r"\[.*\]", "", word.split("==")[0]) for word in extras} | set(requirement_pins())
        assert {"apache-airflow-providers-celery", "redis", "psycopg2-binary", "apache-airflow-providers-fab"} <= names
        locked = dict(line.strip().split("==") for line in (ROOT / lock).read_text().splitlines() if "==" in line)
        for word in extras:
            name, version = word.split("==")
            assert locked.get(re.sub(r"\[.*\]", "", name), version) == version, f"{word} disagrees with {lock}"


def test_gpu_image_differs_only_by_cuda_tensorflow_of_the_pinned_version():
    cpu, gpu = pip_install(DOCKER / "Dockerfile"), pip_install(DOCKER / "Dockerfile.gpu")
    cuda = f'"tensorflow[and-cuda]=={requirement_pins()["tensorflow"]}"'
    assert cuda in gpu and [word for word in gpu if word != cuda] == cpu
    rest = [step for step in instructions(DOCKER / "Dockerfile.gpu") if "pip install" not in step[1]]
    assert rest == [step for step in instructions(DOCKER / "Dockerfile") if "pip install" not in step[1]]


def test_image_installs_the_project_as_a_package_and_imports_it_from_outside_the_sources():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        steps = instructions(dockerfile)
        install = steps.index(("RUN", "pip install --no-cache-dir --no-deps ."))
        before = steps[:install]
        assert ("COPY", "pyproject.toml README.md ./") in before  # pyproject's readme is part of the build
        top_level = {package.split(".")[0] for package in packages}
        assert all(("COPY", f"{package}/ {package}/") in before for package in top_level)
        [check] = [i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "import tasks" in args]
        project = [args for keyword, args in before if keyword == "WORKDIR"][-1]
        check_dir = [args for keyword, args in steps[:check] if keyword == "WORKDIR"][-1]
        assert check > install and not f"{check_dir}/".startswith(f"{project}/"), \
            "run the import check outside the sources, or it passes on the copied folder"


def test_nothing_relies_on_pythonpath():
    for path in (COMPOSE_FILE, DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        assert "PYTHONPATH" not in path.read_text(), f"{path.name}: install the package instead"


def test_build_context_sends_only_what_the_dockerfiles_copy():
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"):
        rules = [line for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
                 if line and not line.startswith("#")]
        assert rules[0] == "*", "ignore everything (.venv, data, runs) except what is listed"
        allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
        sources = {source.rstrip("/") for keyword, arg in instructions(dockerfile) if keyword == "COPY"
                   for source in arg.split()[:-1]}
        assert sources == allowed
