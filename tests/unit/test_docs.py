"""The documentation: the settings page lists every setting the service reads and is what the code
gives now; the MkDocs site builds in strict mode; the README stays a front door whose links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from service.settings import PROJECT_ROOT, Settings
from tools.settings_doc import PAGE, env_name, render

README = PROJECT_ROOT / "README.md"


def test_every_setting_is_documented() -> None:
    page = PAGE.read_text()
    missing = [name for name in Settings.model_fields if f"\n## `{env_name(name)}`\n" not in page]
    assert not missing, f"docs/settings.md has no section for {missing}"


def test_settings_page_is_current() -> None:
    assert PAGE.read_text() == render(), "docs/settings.md is stale: run python -m tools.settings_doc"


def test_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link or anchor, a missing page or a page left out of the nav fails a strict build."""
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(PROJECT_ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    assert (site / "settings" / "index.html").is_file()


def test_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "the README is a front door of a few screens: reference goes in docs/"
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in targets), "the README links to the docs"
    broken = [t for t in targets if not (PROJECT_ROOT / t).exists()]
    assert not broken, f"the README links to missing files: {broken}"
