"""docker/: the compose files validate (Debian's docker-compose; no engine runs here), their commands are
real ``radvlm-pacs`` commands, and the demonstration Orthanc's routing works in Debian's Orthanc."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from sqlalchemy import select

from radvlm_pacs.checks import HEALTH_AE
from radvlm_pacs.cli import _parser
from records.settings import load_settings
from records.tables import Instance
from testbed.network import wait_for
from testbed.orthanc import running_orthanc
from testbed.radiographs import radiograph, rg1_copy

DOCKER = Path(__file__).resolve().parents[1] / "docker"
COMPOSE = "/usr/bin/docker-compose"
SERVICES = {"redis", "postgres", "migrate", "node", "api", "worker-gpu", "worker-io", "flower", "prometheus", "orthanc",
            "ohif", "vllm", "worker-vllm"}  # the last two in the profile vllm only
PROMTOOL = "/usr/bin/promtool"


def compose_config(file: str, **env: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(COMPOSE) is None:
        raise RuntimeError("docker-compose missing: apt-get install docker-compose")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RADVLM_")}
    return subprocess.run([COMPOSE, "-f", str(DOCKER / file), "config"], capture_output=True, text=True,
                          env={**clean, **env}, timeout=60)


def test_compose_file_validates_and_runs_real_commands_with_health_checks():
    missing = compose_config("compose.yaml")  # no password in the repository: the site sets one
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr
    run = compose_config("compose.yaml", POSTGRES_PASSWORD="site-secret")
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert set(services) == SERVICES
    parser = _parser()
    for name, service in services.items():
        if name == "migrate":  # a job that runs to completion; the others wait for it
            assert service["restart"] == "no" and service["command"] == ["db", "upgrade"]
            continue
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        if test[1] == "radvlm-pacs":
            assert parser.parse_args(test[2:]).func.__name__ == "cmd_health"
        if service.get("image", "").startswith("radvlm-pacs"):
            parser.parse_args(service["command"])  # a command the CLI does not know exits here
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
            assert service["environment"]["RADVLM_DATABASE_URL"].startswith("postgresql+psycopg://radvlm:")
            assert "dicom:/srv/radvlm:rw" in service["volumes"]  # one storage for node and workers
    gpu = services["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu" and "models:/models:rw" in gpu["volumes"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    # several studies at once share the GPU's decode steps; such a worker exits when Redis goes away: restarted
    assert gpu["command"] == ["worker", "--concurrency", "8"] and gpu["restart"] == "unless-stopped"
    assert services["worker-io"]["command"] == ["worker", "--queues", "io"]
    assert "Dockerfile.gpu" not in str(services["worker-io"]["build"])


def test_the_vllm_profile_serves_radvlm_with_its_template_and_the_worker_keeps_its_batch_full():
    """``--profile vllm``: vLLM serves the model (RadVLM's chat template, prefix caching, the request's greedy
    parameters) on the GPU, and a model worker without a GPU sends it its questions, 32 studies at once."""
    from records.settings import ModelSettings

    services = yaml.safe_load(compose_config("compose.yaml", POSTGRES_PASSWORD="site-secret").stdout)["services"]
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == SERVICES - {"vllm", "worker-vllm"}  # `up` without the profile: as before
    vllm, worker = services["vllm"], services["worker-vllm"]
    assert vllm["profiles"] == worker["profiles"] == ["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:v")  # the upstream image, a pinned release
    command = vllm["command"]
    flags = {flag: command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("--") else True
             for i, flag in enumerate(command) if flag.startswith("--")}
    template = flags["--chat-template"]
    assert any(volume.startswith(str(DOCKER.parent / "radvlm" / "radvlm_chat_template.jinja") + ":" + template)
               for volume in vllm["volumes"])
    assert flags["--enable-prefix-caching"] is True and flags["--generation-config"] == "vllm"
    assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 1}
    [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert vllm["healthcheck"]["test"][0] == "CMD" and "/health" in vllm["healthcheck"]["test"][-1]
    environment = worker["environment"]
    model = ModelSettings(backend=environment["RADVLM_MODEL__BACKEND"],
                          server_url=environment["RADVLM_MODEL__SERVER_URL"],
                          server_model=environment["RADVLM_MODEL__SERVER_MODEL"])
    assert model.server_url == f"http://vllm:{flags['--port']}/v1"
    assert model.server_model == flags["--served-model-name"]
    assert worker["depends_on"]["vllm"]["condition"] == "service_healthy" and "deploy" not in worker
    assert worker["command"] == ["worker", "--concurrency", "32"]
    assert environment["RADVLM_DATABASE_URL"] == services["worker-gpu"]["environment"]["RADVLM_DATABASE_URL"]


def test_the_settings_orthanc_and_node_agree():
    settings = load_settings(DOCKER / "radvlm.toml")
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    assert orthanc["DicomModalities"]["radvlm"] == [settings.node.ae_title, "node", settings.node.port]
    [pacs] = settings.destinations
    assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    assert any(r.matches(orthanc["DicomAet"], "172.18.0.5") for r in settings.node.allowed_callers)
    assert any(r.matches(HEALTH_AE, "127.0.0.1") for r in settings.node.allowed_callers)
    assert not any(r.matches(HEALTH_AE, "172.18.0.5") for r in settings.node.allowed_callers)
    assert settings.api.bind_address == "0.0.0.0"


def test_prometheus_scrapes_every_process_and_its_alerts_pass_their_unit_tests(sqlite_url):
    """The compose file's Prometheus: its targets are the services on the ports the settings give them,
    its configuration and rules pass promtool (Debian's prometheus), the alerts' own unit tests pass,
    and every metric an alert reads is one the service exports."""
    from prometheus_client import REGISTRY

    from records.db import make_engine, make_session_factory
    from records.metrics import StateCollector
    from records.settings import Settings

    run = compose_config("compose.yaml", POSTGRES_PASSWORD="site-secret")
    mounted = {volume.split(":")[0] for volume in yaml.safe_load(run.stdout)["services"]["prometheus"]["volumes"]}
    assert {str(DOCKER / "prometheus" / name) for name in ("prometheus.yml", "alerts.yml")} <= mounted
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: [*(t for c in job.get("static_configs", []) for t in c["targets"]),
                                 *(f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"])]
               for job in config["scrape_configs"]}
    defaults = Settings()
    assert targets == {"node": [f"node:{defaults.node.metrics_port}"], "api": [f"api:{defaults.api.port}"],
                       "worker-gpu": [f"worker-gpu:{defaults.worker.metrics_port}"],
                       "worker-io": [f"worker-io:{defaults.worker.metrics_port}"]}
    assert set(targets) < SERVICES
    if shutil.which(PROMTOOL) is None:
        raise RuntimeError("promtool missing: apt-get install prometheus")
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts-test.yml"]):
        checked = subprocess.run([PROMTOOL, *args], cwd=DOCKER / "prometheus", capture_output=True, text=True,
                                 timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    exported = {family.name for family in REGISTRY.collect()}  # every process's metrics are in records.metrics
    exported |= {family.name for family in StateCollector(make_session_factory(make_engine(sqlite_url)),
                                                         lambda: {"gpu": 0}, lambda: 1).collect()}
    rules = (DOCKER / "prometheus" / "alerts.yml").read_text()
    named = {re.sub(r"_(total|bucket)$", "", name) for name in re.findall(r"\bradvlm_[a-z_]+", rules)}
    assert len(named) == 8 and named <= exported, named - exported


def test_worker_host_file_names_what_it_needs():
    missing = compose_config("worker-host.yaml")
    assert missing.returncode != 0 and "the main host's PostgreSQL URL" in missing.stderr
    run = compose_config("worker-host.yaml", RADVLM_DATABASE_URL="postgresql+psycopg://radvlm:pw@main/radvlm",
                         RADVLM_BROKER_URL="redis://main:6379/0", RADVLM_NFS_SERVER="nfs.example.org",
                         RADVLM_NFS_EXPORT="/export/radvlm")
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load(run.stdout)
    assert config["volumes"]["dicom"]["driver_opts"] == {"type": "nfs", "o": "addr=nfs.example.org,nfsvers=4,rw",
                                                         "device": ":/export/radvlm"}
    worker = config["services"]["worker-gpu"]
    assert worker["environment"]["RADVLM_BROKER_URL"] == "redis://main:6379/0"
    assert _parser().parse_args(worker["command"]).func.__name__ == "cmd_worker"


@pytest.mark.peers
def test_demonstration_orthanc_routes_cr_and_dx_only(sqlite_url, start_node, tmp_path):
    """Debian's Orthanc with the compose file's configuration and Lua script, pointed at a node here."""
    node = start_node(sqlite_url)
    config = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    ae, _, _ = config["DicomModalities"]["radvlm"]
    extra = {"LuaScripts": [str(DOCKER / "orthanc" / "route-to-radvlm.lua")],
             "DicomCheckCalledAet": config["DicomCheckCalledAet"],
             "DicomAlwaysAllowStore": config["DicomAlwaysAllowStore"]}
    with running_orthanc(tmp_path / "orthanc", {"radvlm": (ae, "127.0.0.1", node.port)},
                         ae_title=config["DicomAet"], extra=extra) as orthanc:
        other = rg1_copy(tmp_path, "not-cr.dcm", Modality="OT")
        orthanc.upload(other)  # first: routed or not, it would arrive before the others
        orthanc.upload(radiograph("RG1_UNCI.dcm"))
        orthanc.upload(radiograph("RG3_UNCI.dcm"))

        def received() -> set[str]:
            with node.sessions() as session:
                return set(session.scalars(select(Instance.sop_instance_uid)))

        wait_for(lambda: len(received()) >= 2, 30)
        time.sleep(1.0)  # room for a wrongly routed instance to arrive
    assert received() == {pydicom.dcmread(radiograph(name)).SOPInstanceUID for name in ("RG1_UNCI.dcm",
                                                                                        "RG3_UNCI.dcm")}


def test_ohif_reaches_the_demonstration_orthanc_on_its_own_origin():
    template = (DOCKER / "ohif" / "default.conf.template").read_text()
    orthanc = json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())
    assert f"proxy_pass http://orthanc:{orthanc['HttpPort']}{orthanc['DicomWeb']['Root']};" in template
    [(user, password)] = orthanc["RegisteredUsers"].items()
    assert base64.b64encode(f"{user}:{password}".encode()).decode() in template
    config = (DOCKER / "ohif" / "app-config.js").read_text()
    assert "qidoRoot: window.location.origin + '/dicom-web'" in config  # what tests/results/test_viewer.py serves too
