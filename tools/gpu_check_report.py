"""The report of ``tools/gpu_check.sh``: its parts' outcomes, the tests' counts and every
bench row, as ``results.json`` and as Markdown tables in ``results.md``.

    python tools/gpu_check_report.py WORK_DIR OUT_DIR MODE

WORK_DIR holds ``parts.tsv`` (one "name, exit status, seconds, limit" line per part run so
far), the tests' ``tests.xml`` (JUnit) and one ``<part>.json`` of rows per bench part.
The check rewrites the report after each part, so a stopped check still leaves one.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_parts(work: Path) -> list[dict]:
    """Each part's name, outcome ("ok", "failed", "timed out", "skipped"), time and limit."""
    parts = []
    path = work / "parts.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, limit = line.split("\t")
        outcome = {"0": "ok", "124": "timed out", "137": "timed out",
                   "skipped": "skipped"}.get(rc, f"failed (exit {rc})")
        parts.append({"name": name, "outcome": outcome, "seconds": int(seconds),
                      "limit": int(limit)})
    return parts


def read_tests(path: Path) -> dict | None:
    """The JUnit file's counts and the ids of the tests that failed or errored."""
    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "time_seconds": float(suite.get("time", 0)), "failed": failed}


def read_rows(work: Path, parts: list[dict]) -> list[dict]:
    """The bench rows of every part that wrote some, tagged with the part's name."""
    rows = []
    for part in parts:
        path = work / f"{part['name']}.json"
        if path.exists():
            rows += [{"part": part["name"], **row} for row in json.loads(path.read_text())]
    return rows


def _number(value: float | None, form: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, form)


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['mode']})", "",
             "| part | outcome | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['outcome']} | {p['seconds']} | {p['limit']} |"
              for p in report["parts"]]
    tests = report["tests"]
    if tests:
        lines += ["", f"Tests: {tests['tests']} run, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped "
                      f"({tests['time_seconds']:.0f} s)."]
        lines += [f"- failed: `{name}`" for name in tests["failed"]]
    devices = sorted({r["device"] for r in report["rows"] if "device" in r})
    lines += ["", "Devices: " + ("; ".join(devices) or "-"), "",
              "| config | precision | stage | variant | batch | median s | img/s | MFU | "
              "device peak MiB | RSS growth MiB | warm-up s | JAX/this |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        head = f"| {r['config']} | {r['precision']} | {r['stage']} | {r['variant']} | " \
               f"{r['batch_size']} |"
        if "error" in r:
            error = r["error"][:300].replace("|", "/").replace("\n", " ")
            lines.append(f"{head} failed: {error} |" + " |" * 6)
            continue
        lines.append(
            f"{head} {r['step_seconds_median']:.4f} | {r['images_per_second']:.1f} | "
            f"{_number(r.get('mfu'), '.1%')} | "
            f"{_number(r.get('device_peak_bytes'), '.0f', 2**20)} | "
            f"{_number(r['rss_growth_bytes'], '.0f', 2**20)} | "
            f"{r['warmup_seconds']:.1f} | {_number(r.get('jax_over_torch'), '.2f')} |")
    lines += ["", "JAX/this: the JAX median step time over this row's (below 1: JAX is "
                  "faster). MFU: XLA's FLOPs per step over the median time and the device's "
                  "dense peak. Warm-up includes compilation."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    work, out, mode = Path(argv[0]), Path(argv[1]), argv[2]
    parts = read_parts(work)
    report = {"mode": mode, "parts": parts, "tests": read_tests(work / "tests.xml"),
              "rows": read_rows(work, parts)}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))


if __name__ == "__main__":
    main(sys.argv[1:])
