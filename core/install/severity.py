"""Severity of an OSV record: its textual rating and CVSS v3 base scores, the highest wins.

Pure. OSV carries severity in two places: `database_specific.severity` (GitHub's advisories:
LOW, MODERATE, HIGH, CRITICAL) and `severity[]` entries (`type` CVSS_V3 with a vector, CVSS_V4,
CVSS_V2). A CVSS v3 vector is scored here with the specification's base formula (FIRST, CVSS
v3.1 section 7.1) and rated as the specification rates it (0.1-3.9 low, 4.0-6.9 medium, 7.0-8.9
high, 9.0-10.0 critical). v2 and v4 vectors are not scored (v4 needs the specification's lookup
tables); a record with only those and no textual rating is `unknown`. When several claims are
readable, the highest is kept: an audit should not under-report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from core.state.audits import RANKED

_TEXT = {
    "low": "low",
    "moderate": "medium",
    "medium": "medium",
    "high": "high",
    "important": "high",
    "critical": "critical",
}
_AV = {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2}
_AC = {"L": 0.77, "H": 0.44}
_PR_UNCHANGED = {"N": 0.85, "L": 0.62, "H": 0.27}
_PR_CHANGED = {"N": 0.85, "L": 0.68, "H": 0.5}
_UI = {"N": 0.85, "R": 0.62}
_CIA = {"H": 0.56, "L": 0.22, "N": 0.0}


def _roundup(value: float) -> float:
    """CVSS v3.1 Roundup: the smallest one-decimal number >= value, float-error safe."""
    scaled = round(value * 100_000)
    if scaled % 10_000 == 0:
        return scaled / 100_000
    return (math.floor(scaled / 10_000) + 1) / 10


def cvss3_base_score(vector: str) -> float | None:
    """The base score of a `CVSS:3.x/AV:../AC:../...` vector; None when it is not one."""
    parts = vector.strip().split("/")
    if not parts or not parts[0].startswith("CVSS:3"):
        return None
    metrics = dict(p.split(":", 1) for p in parts[1:] if ":" in p)
    try:
        changed = {"U": False, "C": True}[metrics["S"]]
        av, ac, ui = _AV[metrics["AV"]], _AC[metrics["AC"]], _UI[metrics["UI"]]
        pr = (_PR_CHANGED if changed else _PR_UNCHANGED)[metrics["PR"]]
        c, i, a = _CIA[metrics["C"]], _CIA[metrics["I"]], _CIA[metrics["A"]]
    except KeyError:
        return None
    iss = 1 - (1 - c) * (1 - i) * (1 - a)
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    if impact <= 0:
        return 0.0
    exploitability = 8.22 * av * ac * pr * ui
    total = (1.08 if changed else 1.0) * (impact + exploitability)
    return _roundup(min(total, 10.0))


def rating(score: float) -> str:
    if score >= 9.0:
        return "critical"
    if score >= 7.0:
        return "high"
    if score >= 4.0:
        return "medium"
    return "low"  # a 0.0 ("none") score is still an advisory someone published


def text_severity(value: object) -> str | None:
    return _TEXT.get(value.strip().lower()) if isinstance(value, str) else None


def _claims(record: dict[str, object]) -> Iterable[tuple[str, str]]:
    """(severity, what the source said) for every readable severity claim of a record."""
    specific = record.get("database_specific")
    if isinstance(specific, dict) and (sev := text_severity(specific.get("severity"))):
        yield sev, str(specific["severity"])
    affected_list = record.get("affected")
    for affected in affected_list if isinstance(affected_list, list) else []:
        for key in ("ecosystem_specific", "database_specific"):
            inner = affected.get(key) if isinstance(affected, dict) else None
            if isinstance(inner, dict) and (sev := text_severity(inner.get("severity"))):
                yield sev, str(inner["severity"])
    entries = record.get("severity")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("score"), str):
            continue
        score = str(entry["score"])
        if (base := cvss3_base_score(score)) is not None:
            yield rating(base), f"{score} (base {base})"
        else:
            try:
                number = float(score)
            except ValueError:
                continue
            if 0 <= number <= 10:
                yield rating(number), score


def osv_severity(record: dict[str, object]) -> tuple[str, str]:
    """(severity, its source text) of an OSV record; ("unknown", "") when none is readable."""
    best: tuple[str, str] = ("unknown", "")
    for sev, said in _claims(record):
        if best[0] == "unknown" or RANKED.index(sev) > RANKED.index(best[0]):
            best = (sev, said)
    return best
