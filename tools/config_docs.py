"""Rewrite the config key tables of docs/pipeline.md and the flag tables of docs/training.md
from the keys' declarations.

    python tools/config_docs.py          # rewrite them
    python tools/config_docs.py --check  # exit 1 if one is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxflow_jax.pipeline.key_docs import PAGES, missing_tables, with_tables

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 when a table is out of date")
    parser.add_argument("--docs", type=Path, default=DOCS,
                        help="the docs folder (default: %(default)s)")
    args = parser.parse_args(argv)
    status = 0
    for page in PAGES:
        path = args.docs / page
        text = path.read_text(encoding="utf-8")
        missing = missing_tables(page, text)
        current = with_tables(page, text)
        if missing:
            print(f"{path}: no '<!-- keys: NAME -->' ... '<!-- /keys -->' markers for "
                  f"{missing}; add them where those tables belong", file=sys.stderr)
            status = 1
        elif current != text and args.check:
            print(f"{path}: the config tables differ from the declarations; run "
                  "'python tools/config_docs.py' to rewrite them", file=sys.stderr)
            status = 1
        elif current != text:
            path.write_text(current, encoding="utf-8")
            print(f"rewrote the config tables of {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
