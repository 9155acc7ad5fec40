"""Each peer's own venv, bench/.venvs/<peer>, built on first use from requirements/<peer>.txt (exact
pins) and rebuilt when that file changes, so no peer's framework or numpy can shape another's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements"
VENVS = Path(__file__).resolve().parents[1] / ".venvs"


class Unavailable(Exception):
    """A peer that cannot run on this machine; the suite says why and carries on without it."""


def python(peer: str) -> Path:
    """The peer's interpreter, building its venv first when it is missing or its pins changed."""
    requirements = REQUIREMENTS / f"{peer}.txt"
    folder = VENVS / peer
    stamp = folder / ".requirements"
    if stamp.exists() and stamp.read_text() == requirements.read_text():
        return folder / "bin" / "python"
    print(f"building {folder} from {requirements.relative_to(VENVS.parents[1])} (once)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(folder)], peer)
    _run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(requirements)], peer)
    stamp.write_text(requirements.read_text())
    return folder / "bin" / "python"


def _run(command: list[str], peer: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise Unavailable(f"building the {peer} venv failed ({' '.join(command[-4:])}):\n{tail}")


def libpython_env() -> dict[str, str]:
    """LD_LIBRARY_PATH at this interpreter's own libpython. Triton's Python-backend stub otherwise
    loads the system's libpython3.x (here Debian's 3.11.2) under this venv's standard library (3.11.x
    from elsewhere), and the model fails to load (e.g. "'_thread.RLock' object has no attribute
    '_recursion_count'")."""
    paths = [str(sysconfig.get_config_var("LIBDIR")), os.environ.get("LD_LIBRARY_PATH", "")]
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}
