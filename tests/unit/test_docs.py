"""The documentation: the settings page lists every setting the service reads and is what the code
gives now."""

from __future__ import annotations

from service.settings import Settings
from tools.settings_doc import PAGE, env_name, render


def test_every_setting_is_documented() -> None:
    page = PAGE.read_text()
    missing = [name for name in Settings.model_fields if f"\n## `{env_name(name)}`\n" not in page]
    assert not missing, f"docs/settings.md has no section for {missing}"


def test_settings_page_is_current() -> None:
    assert PAGE.read_text() == render(), "docs/settings.md is stale: run python -m tools.settings_doc"
