"""Go-style durations (``"1h30m"``, ``"500ms"``) to and from float seconds.

Settings files are written the Go way so that one file can serve a Go service and a Python
one; durations are the only values whose syntax differs between the two.
"""

import math
import re
from decimal import Decimal

__all__ = ["format_duration", "parse_duration"]

_UNIT_SECONDS = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "µs": Decimal("1e-6"),  # U+00B5 micro sign, as Go prints it
    "μs": Decimal("1e-6"),  # U+03BC greek mu, which Go also accepts
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_NUMBER = r"(?:\d+\.?\d*|\.\d+)"
_UNIT = r"(?:ns|us|µs|μs|ms|s|m|h)"  # "ms" must come before "m"
_GO_DURATION = re.compile(rf"[+-]?(?:{_NUMBER}{_UNIT})+")
_GO_DURATION_PART = re.compile(rf"({_NUMBER})({_UNIT})")


def parse_duration(value: object) -> float:
    """Seconds from a number, a numeric string (``"1.5"``) or a Go duration (``"1h30m"``).

    Durations are written the Go way in the settings files so one file can serve both the
    Go and the Python services.  Raises ``ValueError`` naming the text it could not read.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got the boolean {value}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"duration {value} is too large") from None
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(
            f"expected a duration (seconds, or text like '1h30m'), got {type(value).__name__}"
        )
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} is not a finite number of seconds")
    return seconds


def _parse_duration_text(value: str) -> float:
    text = value.strip()
    try:
        return float(text)  # plain seconds: "30", "0.5", "1e3"
    except ValueError:
        pass
    if not _GO_DURATION.fullmatch(text):
        raise ValueError(
            f"invalid duration {value!r}: expected seconds (e.g. 1.5) or a Go duration "
            "such as '1h30m', '500ms', '30s'"
        )
    # Decimal, so "100us" is exactly 0.0001 s and "1.1s" does not pick up float noise.
    total = sum(
        (Decimal(number) * _UNIT_SECONDS[unit] for number, unit in _GO_DURATION_PART.findall(text)),
        Decimal(0),
    )
    return float(-total if text.startswith("-") else total)


def format_duration(seconds: float) -> str:
    """Go's ``Duration.String()`` form (``1h0m0s``, ``5m0s``, ``1.5s``, ``500ms``, ``0s``),
    which :func:`parse_duration` reads back."""
    ns = round(seconds * 1_000_000_000)
    if ns == 0:
        return "0s"
    sign, ns = ("-" if ns < 0 else ""), abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 1_000_000)}ms"
    hours, ns = divmod(ns, 3600 * 1_000_000_000)
    minutes, ns = divmod(ns, 60 * 1_000_000_000)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return f"{sign}{text}{_decimal(ns, 1_000_000_000)}s"


def _decimal(amount: int, unit: int) -> str:
    whole, fraction = divmod(amount, unit)
    if not fraction:
        return str(whole)
    digits = str(fraction).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"
