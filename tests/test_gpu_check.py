"""tools/gpu_check.sh --cpu: the GPU check's own code path (wheels, parts under time limits,
tests, bench, report) dry-run on the CPU, so the script a GPU machine runs cannot rot."""

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_writes_the_report(tmp_path):
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]

    # What a GPU machine hands back: a few plain files with plain names.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gpu_check.log", "results.json", "results.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)

    report = json.loads((tmp_path / "results.json").read_text())
    assert report["mode"] == "cpu"
    assert [(p["name"], p["outcome"]) for p in report["parts"]] == [
        ("environment", "ok"), ("tests", "ok"), ("tiny-fp32", "ok")]
    assert report["tests"]["tests"] == 2 and report["tests"]["failed"] == []
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows.keys() == {"jax", "torch"}
    assert all("error" not in r and r["batch_size"] == 4 for r in rows.values())
    assert rows["torch"]["jax_over_torch"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| tiny | fp32 | flow | jax | 4 |" in table
    assert "gpu_check done" in (tmp_path / "gpu_check.log").read_text()
