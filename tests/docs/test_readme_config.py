"""The user documentation: the configuration table is complete, no internal references."""

from __future__ import annotations

import re

from service.config import Settings
from tests.docs.snippets import REPO


def test_configuration_table_lists_every_setting() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `OPTSERVE_([A-Z0-9_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(rows) == sorted(name.upper() for name in Settings.model_fields)


def test_user_docs_do_not_refer_to_the_design_document() -> None:
    # DESIGN.md is the developers' contract; it does not ship with optserve
    from tests.docs.snippets import documents

    for path in documents():
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path
