"""The benchmark's pure parts: config variants as TOML, and A/B/A runs turned into comparisons.

No I/O here, so that ``tests/unit/test_bench_compare.py`` checks it with plain values.
``__main__`` runs the processes and the load and hands the numbers to these functions.
"""

from __future__ import annotations

import json
import math
import string
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
Run = Mapping[str, Any]


# --------------------------------------------------------------------------- config variants


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it; tables merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def toml_value(value: object) -> str:
    """One TOML value, tables and arrays of tables written inline (enough for a config file)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # TOML spells inf, -inf and nan as Python does
    if isinstance(value, str):
        # a JSON string is a TOML basic string, except that TOML wants DEL escaped too
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{"
            + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items())
            + "}"
        )
    raise TypeError(f"no TOML form for {type(value).__name__} in a bench config")


def toml_dumps(doc: Mapping[str, Any]) -> str:
    """A TOML document, one top-level key per line; ``tomllib.loads`` gives ``doc`` back."""
    return "".join(f"{toml_value(str(key))} = {toml_value(value)}\n" for key, value in doc.items())


def config_text(base: Mapping[str, Any], extra: str, **names: str) -> str:
    """The config file for a variant: ``extra`` (TOML, ``${name}`` substituted) over ``base``.

    A variant that gives ``upstreams`` (``[[upstreams]]`` tables) replaces the base's
    ``upstream_url``: the config takes one upstream or several, never both, so the base's
    single upstream is dropped rather than kept beside them.

    Raises ``ValueError`` naming the variant's problem, so that a typo in a feature row stops
    the run before any load is sent.
    """
    try:
        text = string.Template(extra).substitute(names)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"feature TOML: unknown or bad ${{...}} placeholder {exc}") from None
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"feature TOML does not parse: {exc}\n{text}") from None
    if "upstreams" in parsed:
        base = {key: value for key, value in base.items() if key != "upstream_url"}
    return toml_dumps(merge(base, parsed))


# --------------------------------------------------------------------------- A/B/A


def alternate(a: Callable[[], T], b: Callable[[], T], rounds: int) -> tuple[list[T], list[T]]:
    """Run ``a``, then ``b`` and ``a`` again ``rounds`` times (A/B/A for one round).

    Every B run sits between two A runs, so a drift of the machine during the row moves the
    mean of the A runs as much as it moves B, and the A runs' spread shows the noise.
    """
    a_runs, b_runs = [a()], []
    for _ in range(rounds):
        b_runs.append(b())
        a_runs.append(a())
    return a_runs, b_runs


def mean_run(runs: Sequence[Run]) -> dict[str, Any]:
    """The mean of each number over the runs; other values (text) as in the first run."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs if key in r]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        out[key] = sum(values) / len(values) if numeric else first
    out["runs"] = len(runs)
    return out


@dataclass(frozen=True, slots=True)
class Metric:
    """One figure compared between the two builds: where it is in a run and how to show it."""

    label: str
    key: str
    unit: str
    # req/s changes are shown in per cent; latencies, CPU and memory as added units
    relative: bool = False
    # for latencies: the same figure of the direct (no proxy) run, subtracted from each run
    minus: float = 0.0

    def value(self, run: Run) -> float:
        return float(run.get(self.key, math.nan)) - self.minus


@dataclass(frozen=True, slots=True)
class Comparison:
    """One row of the A/B table: this code's runs (A) against the baseline's (B)."""

    case: str
    metric: Metric
    this_runs: tuple[float, ...]
    baseline_runs: tuple[float, ...]

    @property
    def this(self) -> float:
        return sum(self.this_runs) / len(self.this_runs)

    @property
    def baseline(self) -> float:
        return sum(self.baseline_runs) / len(self.baseline_runs)

    def change(self) -> str:
        """This code against the baseline: ``+2.1 %`` (relative) or ``-0.40 ms`` (added)."""
        if self.metric.relative:
            ratio = self.this / self.baseline - 1 if self.baseline else math.nan
            return f"{ratio:+.1%}".replace("%", " %")
        return f"{self.this - self.baseline:+.2f} {self.metric.unit}"

    def noise(self) -> str:
        """How far apart this code's own runs were, in the same terms as ``change``."""
        low, high = min(self.this_runs), max(self.this_runs)
        if self.metric.relative:
            return f"{high / low - 1:.1%}".replace("%", " %") if low else "nan"
        return f"{high - low:.2f} {self.metric.unit}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "metric": self.metric.label,
            "unit": self.metric.unit,
            "this": self.this,
            "baseline": self.baseline,
            "this_runs": list(self.this_runs),
            "baseline_runs": list(self.baseline_runs),
            "change": self.change(),
            "noise": self.noise(),
        }


def compare(
    case: str, metrics: Sequence[Metric], a_runs: Sequence[Run], b_runs: Sequence[Run]
) -> list[Comparison]:
    """One comparison per metric from the runs of the two builds."""
    return [
        Comparison(
            case,
            m,
            tuple(m.value(r) for r in a_runs),
            tuple(m.value(r) for r in b_runs),
        )
        for m in metrics
    ]


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "nan"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    return f"{value:,.2f} {unit}" if abs(value) < 100 else f"{value:,.0f} {unit}"


def markdown_table(rows: Sequence[Comparison], this_name: str, baseline_name: str) -> str:
    """The A/B rows as a Markdown table, ready for a note or the README."""
    lines = [
        f"| case | this code ({this_name}) | baseline ({baseline_name}) | change | "
        "spread of this code's runs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case}, {r.metric.label} | {_fmt(r.this, r.metric.unit)} | "
            f"{_fmt(r.baseline, r.metric.unit)} | {r.change()} | {r.noise()} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- feature cost


def feature_cost(run: Run, before: Run, after: Run) -> dict[str, float]:
    """A variant's run against the plain runs just before and after it (same load).

    ``rps`` and ``cpu_us`` are the variant's own; ``rps_change`` is its throughput against the
    mean of the two plain runs, ``cpu_us_added`` its CPU per request minus theirs.
    """
    rps = (before["rps"] + after["rps"]) / 2
    cpu = (before["cpu_us"] + after["cpu_us"]) / 2
    return {
        "rps": run["rps"],
        "cpu_us": run["cpu_us"],
        "rps_change": run["rps"] / rps - 1 if rps else math.nan,
        "cpu_us_added": run["cpu_us"] - cpu,
    }
