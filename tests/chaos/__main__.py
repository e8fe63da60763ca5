"""python -m tests.chaos [--seconds 40] [--threads 6] [--no-restarts] [--json PATH] ...

Prints the soak's report; exits 1 when an invariant failed (or a thread crashed), else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .soak import Options, run


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="whole run")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="workers")
    parser.add_argument(
        "--calm", type=float, default=defaults.calm, help="seconds without faults at the start"
    )
    parser.add_argument("--accounts", type=int, default=defaults.accounts)
    parser.add_argument("--retries", type=int, default=defaults.retries, help="per transfer")
    parser.add_argument(
        "--fault-every",
        type=float,
        default=defaults.fault_every,
        help="mean seconds between proxy cuts / backend terminations",
    )
    parser.add_argument("--no-restarts", action="store_true", help="never restart the server")
    parser.add_argument(
        "--restart-every",
        type=float,
        default=defaults.restart_every,
        help="mean seconds between server restarts (fast and immediate in turn)",
    )
    parser.add_argument(
        "--downtime", type=float, default=defaults.downtime, help="seconds down per restart"
    )
    parser.add_argument("--seed", type=int, help="random choices (not thread timing)")
    parser.add_argument("--max-open-conns", type=int, help="pool size (default: --threads)")
    parser.add_argument("--breaker-threshold", type=int, help="breaker_failure_threshold")
    parser.add_argument("--breaker-recovery", type=float, help="breaker_recovery_timeout (s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    options = Options(
        seconds=args.seconds,
        threads=args.threads,
        calm=args.calm,
        accounts=args.accounts,
        retries=args.retries,
        fault_every=args.fault_every,
        restarts=not args.no_restarts,
        restart_every=args.restart_every,
        downtime=args.downtime,
        seed=args.seed,
        max_open_conns=args.max_open_conns,
        breaker_failure_threshold=args.breaker_threshold,
        breaker_recovery_timeout=args.breaker_recovery,
        progress=not args.quiet,
    )
    result = run(options, out=sys.stdout)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
