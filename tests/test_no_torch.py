"""The service must run where torch is not installed (the runtime image has none)."""

from __future__ import annotations

import subprocess
import sys

from service.settings import PROJECT_ROOT

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import service.__main__
from service.app import create_app
from fastapi.testclient import TestClient
with TestClient(create_app()) as client:
    assert client.get("/health/ready").status_code == 200, client.get("/health/ready").text
assert not any(name == "torch" or name.startswith("torch.") for name, m in sys.modules.items() if m is not None)
print("ok")
"""


def test_service_imports_and_serves_without_torch() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
