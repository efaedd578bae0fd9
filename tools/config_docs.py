"""Rewrite the config key tables of docs/pipeline.md from the keys' declarations.

    python tools/config_docs.py          # rewrite them
    python tools/config_docs.py --check  # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxflow_jax.pipeline.key_docs import missing_tables, with_tables

DOCS = Path(__file__).resolve().parent.parent / "docs" / "pipeline.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare; exit 1 when a table is out of date")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the file (default: %(default)s)")
    args = parser.parse_args(argv)
    text = args.docs.read_text(encoding="utf-8")
    missing = missing_tables(text)
    if missing:
        print(f"{args.docs}: no '<!-- keys: NAME -->' ... '<!-- /keys -->' markers for "
              f"{missing}; add them where those tables belong", file=sys.stderr)
        return 1
    current = with_tables(text)
    if args.check:
        if current != text:
            print(f"{args.docs}: the config key tables differ from the declarations; run "
                  "'python tools/config_docs.py' to rewrite them", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.docs.write_text(current, encoding="utf-8")
        print(f"rewrote the key tables of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
