"""Structural checks of the deployment files in infra/, without Docker or a cluster.

What a typo there would break only at `docker compose up` or at a flow run's first
Kubernetes job is checked here: the services and their wiring, health checks and start-up
order, volumes, loopback-only ports, credentials that come only from variables (with a
checker that is itself tested on bad snippets), `.env.example` against the variables the
compose file uses, the work-pool job template's placeholders against its variables schema,
and the Dockerfile's non-root user, project install, C compiler and build-context exclusions,
and infra/README.md's `prefect deploy` commands as Prefect resolves them against prefect.yaml.

    .venv/bin/python -m pytest -q tests/test_infra.py
"""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
JOB_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
WORKER_VALUES = INFRA / "k8s" / "worker-values.yaml"

REQUIRED_SERVICES = {"postgres", "prefect-server", "worker", "mlflow", "minio", "minio-setup"}
# (service, dependency) pairs the start-up order needs
REQUIRED_DEPENDENCIES = {
    ("prefect-server", "postgres"),
    ("mlflow", "postgres"),
    ("mlflow", "minio"),
    ("mlflow", "minio-setup"),
    ("minio-setup", "minio"),
    ("worker", "prefect-server"),
    ("worker", "mlflow"),
}
STATEFUL_SERVICES = {"postgres": "/var/lib/postgresql/data", "minio": "/data", "worker": "/data"}


# --- compose helpers ---------------------------------------------------------------------

# Compose interpolation: `$$` is a literal dollar (the container's shell expands it), `${VAR...}`
# and `$VAR` are read from the environment / infra/.env.
_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_DEFAULTED = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}")


def _strings(node, path=()):
    """Every scalar in a parsed YAML tree, with its key path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, str(i)))
    elif node is not None:
        yield path, str(node)


def compose_variables(compose: dict) -> dict[str, set[str]]:
    """Each variable Compose interpolates (not the `$$VAR` escapes), with the `${...}` forms used."""
    found: dict[str, set[str]] = {}
    for _, text in _strings(compose):
        for m in _COMPOSE_VAR.finditer(text.replace("$$", "")):
            found.setdefault(m.group(1) or m.group(2), set()).add(m.group(0))
    return found


def with_defaults(value: str) -> str:
    """`value` as Compose renders it when every `${VAR:-default}` takes its default."""
    return _DEFAULTED.sub(lambda m: m.group(1), value)


def env_dict(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def one_shot_services(services: dict) -> set[str]:
    """Services something waits for to *finish* (service_completed_successfully)."""
    return {
        dep
        for service in services.values()
        if isinstance(service.get("depends_on"), dict)
        for dep, spec in service["depends_on"].items()
        if (spec or {}).get("condition") == "service_completed_successfully"
    }


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each of a service's mounts, short or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            mounts.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            parts = entry.split(":")
            mounts.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return mounts


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


# --- the plain-text secret checker ---------------------------------------------------------

# names (env vars, keys, flags) whose values are credentials
_SECRET_NAME = re.compile(r"(?i)pass(word|wd)?|secret|token|api_?key|access_?key|auth_?string|credential")
# A credential may only be a reference: `${VAR}` / `${VAR?msg}` / `${VAR:?msg}` for Compose
# (a `:-default` would be a literal fallback password), or `$$VAR` / `$${VAR}` for the
# container's shell, which got VAR from a Compose reference itself.
_REFERENCE = re.compile(r"""^\s*["']?(\$\{[A-Za-z_]\w*(:?\?[^}]*)?\}|\$\$\{?[A-Za-z_]\w*\}?)["']?\s*$""")
_VALUE = r"""(\$\{[^}]*\}|"[^"]*"|'[^']*'|[^\s"']+)"""
_ASSIGNMENT = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)=" + _VALUE)
_FLAG = re.compile(r"(--?[A-Za-z0-9_-]+)(?:=|\s+)" + _VALUE)
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:(\$\{[^}]*\}|[^@\s/]+)@")
# well-known defaults and .env.example placeholders, which belong in no compose file
_KNOWN_DEFAULTS = re.compile(r"(?i)\bminioadmin\b|change-me")


def _is_reference(value: str) -> bool:
    return bool(_REFERENCE.match(value))


def find_plaintext_secrets(compose: dict) -> list[str]:
    """Every place where `compose` holds a credential as a literal instead of a `${VAR}`.

    Looks at keys named like credentials (`POSTGRES_PASSWORD: hunter2`), `NAME=value`
    assignments (list-form environment, shell commands), `--password value` flags, passwords
    inside URLs (`postgresql://user:pw@host`) and well-known default passwords.
    """
    findings = []
    for path, text in _strings(compose):
        where = ".".join(path)
        if path and _SECRET_NAME.search(path[-1]) and not path[-1].isdigit() and not _is_reference(text):
            findings.append(f"{where}: literal value for {path[-1]}")
        for name, value in _ASSIGNMENT.findall(text):
            if _SECRET_NAME.search(name) and not _is_reference(value):
                findings.append(f"{where}: {name}= is a literal")
        for password in _URL_PASSWORD.findall(text):
            if not _is_reference(password):
                findings.append(f"{where}: URL with a literal password")
        if _KNOWN_DEFAULTS.search(text):
            findings.append(f"{where}: well-known default or placeholder credential")
    # flags and their values can be separate list items: look at each command as one line too
    for path, node in _command_lists(compose):
        line = " ".join(str(part) for part in node)
        for flag, value in _FLAG.findall(line):
            if _SECRET_NAME.search(flag) and not _is_reference(value):
                findings.append(f"{'.'.join(path)}: {flag} is given a literal")
    return findings


def _command_lists(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("command", "entrypoint", "test") and isinstance(value, (list, str)):
                yield (*path, key), value if isinstance(value, list) else [value]
            else:
                yield from _command_lists(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _command_lists(value, (*path, str(i)))


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME=value"
            entries[name] = value
    return entries


@pytest.fixture(scope="module")
def job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


# --- compose: services, health, order, volumes, ports ----------------------------------------


def test_required_services_present(services):
    assert REQUIRED_SERVICES <= services.keys(), f"missing: {REQUIRED_SERVICES - services.keys()}"


def test_every_long_running_service_has_a_healthcheck(services):
    one_shot = one_shot_services(services)
    assert one_shot == {"minio-setup"}
    for name, service in services.items():
        if name in one_shot:
            assert service.get("restart", "no") == "no", f"{name} runs once and must not restart"
            continue
        check = service.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test") not in (None, [], ["NONE"]), f"{name} has no healthcheck"


def test_depends_on_waits_for_health(services):
    one_shot = one_shot_services(services)
    edges = set()
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs the long form with a condition"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            expected = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert (spec or {}).get("condition") == expected, f"{name} -> {dep} should wait for {expected}"
            edges.add((name, dep))
    assert REQUIRED_DEPENDENCIES <= edges, f"missing: {REQUIRED_DEPENDENCIES - edges}"


def test_state_lives_in_declared_named_volumes(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, _ in volume_mounts(service):
            if is_named_volume(source):
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
            elif source.startswith("."):
                host_path = (INFRA / source).resolve()
                assert host_path.exists(), f"{name} bind-mounts missing {source}"
    assert declared == used, f"declared but unused volumes: {declared - used}"
    for name, target in STATEFUL_SERVICES.items():
        named_targets = {t for s, t in volume_mounts(services[name]) if is_named_volume(s)}
        assert target in named_targets, f"{name} keeps {target} outside a named volume"


def test_published_ports_bind_to_loopback(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports") or []:
            published += 1
            if isinstance(port, dict):
                host_ip = with_defaults(str(port.get("host_ip", "")))
            else:
                parts = with_defaults(str(port)).split(":")
                assert len(parts) == 3, f"{name}: {port!r} publishes on every interface"
                host_ip = parts[0]
            assert host_ip == "127.0.0.1", f"{name}: {port!r} binds to {host_ip or 'all interfaces'}"
    assert published
    assert not services["postgres"].get("ports"), "PostgreSQL is reached over the compose network only"


def test_worker_reserves_nvidia_gpus_and_reaches_both_servers(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    context = (INFRA / worker["build"]["context"]).resolve()  # relative to the compose file
    assert (context / "pyproject.toml").is_file(), "the worker image is built from the repository root"
    assert (context / worker["build"]["dockerfile"]).is_file()
    command = " ".join(worker["command"])
    assert "worker start" in command and "--type process" in command
    env = env_dict(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["T2I_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env.keys()


def test_prefect_server_runs_on_postgres_with_auth(services):
    env = env_dict(services["prefect-server"])
    url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == env_dict(services["worker"])["PREFECT_API_AUTH_STRING"]


def test_mlflow_server_uses_postgres_minio_and_basic_auth(services):
    mlflow = services["mlflow"]
    args = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql" in args
    assert "--serve-artifacts" in args and "--artifacts-destination=s3://" in args
    assert "--app-name=basic-auth" in args
    env = env_dict(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]
    mounted = {target: source for source, target in volume_mounts(mlflow)}
    assert config_path in mounted, "the basic-auth config must be mounted where MLFLOW_AUTH_CONFIG_PATH points"

    config = configparser.ConfigParser()
    assert config.read(INFRA / mounted[config_path])
    section = config["mlflow"]
    assert section["default_permission"] and section["authorization_function"]
    assert "admin_password" not in section, "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    assert urlsplit(section["database_uri"]).password is None, "the user store's password comes from PGPASSWORD"
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"} <= env.keys()


# --- compose: credentials and .env.example --------------------------------------------------


def test_compose_holds_no_plaintext_secrets(compose):
    assert find_plaintext_secrets(compose) == []


BAD_SNIPPETS = {
    "mapping env": "services: {db: {environment: {POSTGRES_PASSWORD: hunter2}}}",
    "numeric value": "services: {db: {environment: {POSTGRES_PASSWORD: 123456}}}",
    "list env": "services: {db: {environment: [POSTGRES_PASSWORD=hunter2]}}",
    "literal fallback": "services: {db: {environment: {POSTGRES_PASSWORD: '${POSTGRES_PASSWORD:-hunter2}'}}}",
    "url": "services: {app: {environment: {DATABASE_URL: 'postgresql://app:hunter2@db:5432/app'}}}",
    "flag": "services: {app: {command: [serve, --password, hunter2]}}",
    "shell": "services: {app: {command: 'export API_TOKEN=abc123 && serve'}}",
    "known default": "services: {mc: {command: 'mc alias set local http://minio:9000 minioadmin minioadmin'}}",
}


@pytest.mark.parametrize("snippet", BAD_SNIPPETS.values(), ids=BAD_SNIPPETS.keys())
def test_secret_checker_catches_literals(snippet):
    assert find_plaintext_secrets(yaml.safe_load(snippet))


def test_secret_checker_accepts_references():
    good = yaml.safe_load(
        """
        services:
          db:
            environment:
              POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set in .env}
              DATABASE_URL: postgresql+asyncpg://app:${DB_PASSWORD:?set in .env}@db:5432/app
              PGPASSWORD: ${PGPASSWORD}
              POSTGRES_USER: ${POSTGRES_USER:-postgres}
            healthcheck:
              test: ["CMD-SHELL", "PGPASSWORD=$$POSTGRES_PASSWORD pg_isready -U $$POSTGRES_USER"]
          app:
            command: [serve, --password, "$${APP_PASSWORD}", --port=8080]
        """
    )
    assert find_plaintext_secrets(good) == []


def test_env_example_lists_exactly_the_compose_variables(compose, env_example):
    used = compose_variables(compose).keys()
    assert used, "the compose file reads no variables?"
    assert used - env_example.keys() == set(), "add these to infra/.env.example"
    assert env_example.keys() - used == set(), "infra/.env.example lists variables the compose file never reads"


def test_env_example_holds_placeholders_only(env_example):
    for name, value in env_example.items():
        if _SECRET_NAME.search(name):
            assert "change-me" in value, f"{name} in .env.example must be a change-me placeholder"


def test_credentials_are_required_variables(compose):
    """A credential variable is read as `${VAR:?message}`: unset, `up` stops instead of running
    with an empty or built-in password."""
    credentials = {name: forms for name, forms in compose_variables(compose).items() if _SECRET_NAME.search(name)}
    assert {"POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD"} <= credentials.keys()
    for name, forms in credentials.items():
        for form in forms:
            assert form.startswith("${" + name + ":?"), f"{form}: make it ${{{name}:?set it in infra/.env}}"


def test_local_env_file_is_git_ignored():
    assert ".env" in (INFRA / ".gitignore").read_text().split()


# --- Kubernetes work pool and worker ----------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([\w.\-\[\]$]+)\s*\}\}")  # the pattern Prefect's templating uses


def test_job_template_placeholders_match_its_variables(job_template):
    assert {"job_configuration", "variables"} <= job_template.keys()
    properties = job_template["variables"]["properties"]
    placeholders = {m for _, text in _strings(job_template["job_configuration"]) for m in _PLACEHOLDER.findall(text)}
    assert placeholders - properties.keys() == set(), "placeholders without a variable"
    assert properties.keys() - placeholders == set(), "variables no placeholder uses"


def test_job_template_requests_gpus_and_passes_torchrun_settings(job_template):
    properties = job_template["variables"]["properties"]
    assert properties["gpu_count"]["type"] == "integer" and properties["gpu_count"]["default"] == 1
    assert "image" in job_template["variables"].get("required", []) and "namespace" in properties

    pod = job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    env = {item["name"]: item for item in container["env"]}
    assert env["PET_NNODES"]["value"] == "{{ torchrun_nnodes }}"
    assert env["PET_RDZV_ENDPOINT"]["value"] == "{{ torchrun_rdzv_endpoint }}"
    for name, item in env.items():
        if _SECRET_NAME.search(name):
            assert "secretKeyRef" in item.get("valueFrom", {}), f"{name} must come from a Secret"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_job_template_renders_with_prefect_templating(job_template):
    """Render the way the worker does (Prefect's own apply_values) and check Kubernetes types."""
    from prefect.utilities.templating import apply_values

    values = {k: v["default"] for k, v in job_template["variables"]["properties"].items() if "default" in v}
    values |= {"image": "registry.example.com/t2i-pipeline:0.1.0", "name": "run", "env": {}, "labels": {}}
    rendered = apply_values(job_template["job_configuration"], values)
    (container,) = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == values["image"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "32Gi"}
    for item in container["env"]:  # Kubernetes rejects non-string env values
        assert isinstance(item.get("value", ""), str), item


def test_worker_values_use_secrets_for_auth():
    values = yaml.safe_load(WORKER_VALUES.read_text())["worker"]
    assert values["config"]["workPool"] == "gpu-k8s" and values["config"]["type"] == "kubernetes"
    assert values["apiConfig"] == "selfHostedServer"
    server = values["selfHostedServerApiConfig"]
    assert server["apiUrl"].endswith("/api")
    assert server["basicAuth"]["enabled"] is True and server["basicAuth"]["existingSecret"]
    assert "authString" not in server["basicAuth"], "the auth string belongs in the Secret"


# --- images and docs ------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


@pytest.mark.parametrize("path", [INFRA / "Dockerfile", INFRA / "mlflow" / "Dockerfile"], ids=["worker", "mlflow"])
def test_images_run_as_non_root(path):
    users = [args.split(":")[0].strip() for instr, args in dockerfile_instructions(path) if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name} must end as a non-root USER"


def test_worker_image_installs_the_project():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    base = " ".join(args for instr, args in instructions if instr in ("ARG", "FROM") and "pytorch" in args)
    assert "cuda" in base, "the worker image builds on a CUDA PyTorch base"
    assert any(instr == "COPY" and args.split()[0] == "." for instr, args in instructions)
    assert any(instr == "RUN" and re.search(r"pip install\b.*\s(-e\s+)?\.(\s|$)", args) for instr, args in instructions)
    env = " ".join(args for instr, args in instructions if instr == "ENV")
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env and "MLFLOW_DISABLE_TELEMETRY=true" in env


def test_readme_paths_exist():
    readme = (INFRA / "README.md").read_text()
    paths = set(re.findall(r"\binfra/[\w./-]*\w", readme))
    assert paths
    for path in paths:
        if not path.endswith("/.env"):  # the local copy each user makes
            assert (INFRA.parent / path).exists(), f"infra/README.md names missing {path}"


def test_worker_image_has_a_c_compiler_when_a_preset_compiles():
    """torch.compile's Triton backend builds its launcher with a host C compiler at run time;
    the CUDA *runtime* PyTorch images ship none ("Failed to find C compiler", pytorch#116696)."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    compiling = [p.name for p in configs.glob("*.yaml") if ((yaml.safe_load(p.read_text()) or {}).get("train") or {}).get("compile")]
    if not compiling:
        pytest.skip("no preset sets train.compile")
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    base = " ".join(args for instr, args in instructions if instr in ("ARG", "FROM") and "pytorch" in args)
    installs_cc = any(
        instr == "RUN" and re.search(r"apt-get install\b.*\b(gcc|build-essential|clang)\b", args) for instr, args in instructions
    )
    assert "-devel" in base or installs_cc, f"{compiling} set train.compile: the worker image needs a C compiler"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative to the context) or a folder above it matches a dockerignore pattern
    (the last matching pattern wins; `!` re-includes; `**/` matches any depth, the root included)."""
    import fnmatch

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        # fnmatch's `*` also matches `/`, so `*/name` stands for `**/name` below the root
        forms = {pattern[3:], "*/" + pattern[3:]} if pattern.startswith("**/") else {pattern}
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_env_files_out_of_the_image():
    """The settings read `.env` (tasks/settings.py) and compose reads infra/.env: both hold
    credentials, are git-ignored, and must not be baked into the image by `COPY . .`."""
    patterns = [
        line.strip()
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert _dockerignored("data/raw/x.png", patterns) and not _dockerignored("flows/cli.py", patterns)
    for path in (".env", "infra/.env", "configs/.env"):
        assert _dockerignored(path, patterns), f"{path} would be copied into the worker image"


def _readme_deploy_commands(text: str) -> list[list[str]]:
    """The `prefect ... deploy ...` commands of the README's bash blocks, as argument lists."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in re.sub(r"\\\n", " ", block).splitlines():
            pending += line + "\n"
            try:  # a quoted argument may span lines: read on until its quote closes
                args = shlex.split(pending, comments=True)
            except ValueError:
                continue
            pending = ""
            if "prefect" in (a.rsplit("/", 1)[-1] for a in args) and "deploy" in args:
                commands.append(args[args.index("deploy") + 1 :])
    return commands


def test_readme_deploy_commands_resolve_without_duplicate_schedules():
    """A non-interactive `prefect deploy` run where prefect.yaml lies (the repository root, or
    /opt/prefect in the image) takes that file's one deployment as its template whatever
    --name says, and `--cron` *adds* to its schedules: an equal cron would start every run twice.
    Resolved here with Prefect's own config code, as `prefect deploy` does before any API call."""
    from rich.console import Console

    try:  # Prefect's private deploy-config functions (3.x): a later release may move them
        from prefect.cli.deploy._config import (
            _apply_cli_options_to_deploy_config,
            _load_deploy_configs_and_actions,
            _pick_deploy_configs,
        )
    except ImportError as exc:
        pytest.skip(f"prefect.cli.deploy._config moved in this Prefect release: {exc}")

    console = Console(quiet=True)
    configs, _ = _load_deploy_configs_and_actions(prefect_file=INFRA.parent / "prefect.yaml", console=console)
    commands = _readme_deploy_commands((INFRA / "README.md").read_text())
    assert len(commands) >= 3
    flags = {"--name": "names", "--pool": "work_pool_name", "--cron": "cron", "--params": "params", "--job-variable": "variables"}
    for args in commands:
        options: dict = {"names": [], "cron": [], "variables": []}
        it = iter(args)
        for arg in it:
            if arg in flags:
                key, value = flags[arg], next(it)
                options[key] = [*options[key], value] if isinstance(options.get(key), list) else value
        (picked,) = _pick_deploy_configs(configs, options["names"], console=console, is_interactive=lambda: False)
        resolved, _ = _apply_cli_options_to_deploy_config(picked, options, console=console)
        crons = [s.get("cron") for s in resolved.get("schedules") or []]
        assert len(crons) == len(set(crons)), f"`prefect deploy {' '.join(args)}` gets the schedule {crons} twice"
        assert resolved["work_pool"]["name"] == options["work_pool_name"]
        assert resolved["parameters"] == json.loads(options["params"])
