"""benchmarks/startup.py's import view: it parses `-X importtime` into modules with their nesting."""
from __future__ import annotations

from benchmarks import startup


def test_import_profile_names_the_module_and_its_children():
    prof = startup.import_profile("email.mime.text", top=50)
    assert prof["returncode"] == 0 and prof["wall_s"] > 0
    rows = {r["module"]: r for r in prof["top"]}
    outer = rows["email.mime.text"]
    assert outer["depth"] == 0 and outer["cumulative_s"] >= outer["self_s"] >= 0
    inner = [r for r in prof["top"] if r["module"].startswith("email.") and r["depth"] > 0]
    assert inner and all(r["cumulative_s"] <= outer["cumulative_s"] for r in inner)
