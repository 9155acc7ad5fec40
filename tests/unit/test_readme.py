"""The README's settings table must list every setting the service reads."""

from __future__ import annotations

from service.settings import PROJECT_ROOT, Settings


def test_every_setting_is_documented() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    prefix = Settings.model_config.get("env_prefix", "")
    missing = [name for name in Settings.model_fields if f"`{prefix}{name.upper()}`" not in readme]
    assert not missing, f"README settings table lacks {missing}"
