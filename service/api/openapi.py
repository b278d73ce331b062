"""Export the app's OpenAPI document, or check that a committed copy still matches it.

python -m service.api.openapi --write clients/openapi.json
python -m service.api.openapi --check clients/openapi.json   # exit 1 when stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.api.app import create_app
from service.config import Settings

DEFAULT_PATH = Path("clients/openapi.json")


def document() -> dict[str, Any]:
    # Settings are fixed here so the environment cannot change the exported document.
    app = create_app(Settings(storage="memory", api_keys="", api_keys_file=None))
    return app.openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.api.openapi", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", type=Path, nargs="?", const=DEFAULT_PATH, metavar="PATH")
    action.add_argument("--check", type=Path, nargs="?", const=DEFAULT_PATH, metavar="PATH")
    args = parser.parse_args(argv)
    text = render()
    if args.write is not None:
        args.write.write_text(text)
        print(f"wrote {args.write}")
        return 0
    try:
        committed = args.check.read_text()
    except OSError as exc:
        print(f"cannot read {args.check}: {exc}", file=sys.stderr)
        return 1
    if committed != text:
        print(
            f"{args.check} does not match the app's OpenAPI document; "
            f"regenerate it with: python -m service.api.openapi --write {args.check}",
            file=sys.stderr,
        )
        return 1
    print(f"{args.check} matches the app")
    return 0


if __name__ == "__main__":
    sys.exit(main())
