"""The README's measured figures are the ones in benchmarks/results/ (issue 24 §6: the attack paragraph said 241 MB,
132 of 132 and goodput 0.99 while attack.md said 221 MB, 117 and 0.91). Read from the JSON, so a re-run of
benchmarks/attack.py only has to update the README to match."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _attack_paragraphs() -> str:
    """The README's paragraphs about the server's limits and benchmarks/attack.py (goodput and the attack figures)."""
    paras = re.split(r"\n\s*\n", (ROOT / "README.md").read_text())
    return "\n".join(p for p in paras if "attack.py" in p or "goodput" in p)


def test_readme_attack_figures_match_attack_json():
    r = json.loads((ROOT / "benchmarks" / "results" / "attack.json").read_text())
    text = " ".join(_attack_paragraphs().split())
    assert "benchmarks/attack.py" in text

    cases = sum(c["cases"] for c in r["classes"])
    m = re.search(r"throws ([\d,]+) hostile cases", text)
    assert m and _num(m[1]) == cases, (m and m[0], cases)

    m = re.search(r"peak RSS ([\d,]+) MB", text)
    assert m and _num(m[1]) == round(r["server_peak_rss_mb"]), (m and m[0], r["server_peak_rss_mb"])

    normal = r["normal"]
    m = re.search(r"([\d,]+)/([\d,]+) normal requests answered \(p99 ([\d.]+) ms\)", text)
    assert m and (_num(m[1]), _num(m[2])) == (normal["ok"], normal["requests"]), (m and m[0], normal)
    assert _num(m[3]) == round(normal["p99_ms"], 1), (m[0], normal["p99_ms"])

    g = r["goodput"]
    m = re.search(r"kept ([\d,]+) of ([\d,]+) req/s \((\d\.\d\d)\b", text)
    assert m, text
    assert (_num(m[1]), _num(m[2])) == (round(g["overload_200_retrying"]["ok_per_s"]), round(g["capacity_ok_per_s"])), (m[0], g)
    assert m[3] == f"{g['ratio']:.2f}", (m[0], g["ratio"])
    m = re.search(r"against ([\d,]+) req/s with no wait", text)
    assert m and _num(m[1]) == round(g["overload_200_retrying_admit_wait_0"]["ok_per_s"]), (m and m[0], g)


def test_readme_tells_a_newcomer_where_things_are():
    """Where the commands are, what `make test` installs on the system, and what happens without the real data."""
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert ".venv/bin" in readme and ". .venv/bin/activate" in readme
    assert "apt-get" in makefile and "dataset-fashion-mnist" in makefile  # what the README says make test does
    assert "`make test` also installs a\nsystem package with `apt-get`" in readme and "`dataset-fashion-mnist`" in readme
    assert "make data" in readme and "$EDGECONV_DATA" in readme and "data-bound tests skip" in readme


def test_readme_tune_table_matches_tune_json():
    """The README's tune table (benchmarks/tune.py) is benchmarks/results/tune.json's summary: every row's figures and ratios."""
    r = json.loads((ROOT / "benchmarks" / "results" / "tune.json").read_text())
    text = (ROOT / "README.md").read_text()
    assert "benchmarks/tune.py" in text and len(r["summary"]) == 4
    for s in r["summary"]:
        line = next((l for l in text.splitlines() if l.startswith(f"| {s['model']} | {s['objective']} |")), None)
        assert line is not None, s
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert _num(cells[3]) == round(s["tuned ms"], 3) and _num(cells[4]) == round(s["auto ms"], 3), (line, s)
        assert cells[5] == f"{s['best peer']} ({s['peer ms']:.3f})", (line, s)
        assert cells[6] == f"{s['tuned/auto speed']:.2f}x" and cells[7] == f"{s['tuned/best peer speed']:.2f}x", (line, s)
        assert cells[2].startswith(s["tuned"].split(" (")[0].split(",")[0]), (line, s)
