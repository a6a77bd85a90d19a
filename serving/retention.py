"""Retention of the prediction log: drop rows past an age, then all but the newest N.

    python -m serving.retention --log URL [--max_age_days D] [--max_rows N]

URL is any form serving/logstore.py takes (a file path or sqlite: URL, or postgresql://...).
Prints what it deleted as one line and exits 0; 2 for a usage error, 1 when the store fails.
Run it from cron or a Kubernetes CronJob: each run is one transaction, and running it twice
deletes nothing more.
"""

import argparse
import datetime as dt
import sys
import time
from typing import Optional, Sequence

from serving import logstore

DAY_SECONDS = 86400.0


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", required=True,
                        help="the prediction log: a file path or sqlite: URL (SQLite), or postgresql://user:pw@host/db")
    parser.add_argument("--max_age_days", type=_positive(float), help="delete rows older than this many days")
    parser.add_argument("--max_rows", type=_positive(int), help="then keep only the newest this many rows")
    return parser


def main(argv: Optional[Sequence[str]] = None, now: Optional[float] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_age_days is None and args.max_rows is None:
        parser.error("give --max_age_days, --max_rows or both: nothing to delete otherwise")
    try:
        url = logstore.masked_url(args.log)
    except ValueError as e:
        parser.error(f"--log: {e}")
    now = time.time() if now is None else now
    cutoff = None if args.max_age_days is None else now - args.max_age_days * DAY_SECONDS
    try:
        logstore.open_store(args.log, readonly=True).close()  # a mistyped log is an error, not a new empty one
        with logstore.open_store(args.log) as store:
            deleted = store.delete(older_than=cutoff, keep_rows=args.max_rows)
            left = store.count()
    except logstore.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rules = ([f"older than {dt.datetime.fromtimestamp(cutoff, dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"]
             if cutoff is not None else []) + ([f"beyond the newest {args.max_rows}"] if args.max_rows else [])
    print(f"retention {url}: deleted {deleted} rows ({', then '.join(rules)}); {left} left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
