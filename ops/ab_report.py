"""Continuous evaluation: the A/B go/no-go report, from the prediction log and late ground truth.

    python -m ops.ab_report --log build/prediction_log.sqlite --labels labels.csv [--model taxi]
        [--a stable] [--b canary] [--start T] [--end T] [--window_hours H] [--include_shadow]
        [--primary METRIC] [--guardrails M1,M2|none] [--alpha 0.05] [--margin 0.01] [--min_samples 200]
        [--classes no,yes] [--json report.json]

The proxy logs every request with the variant that answered it (serving/predlog.py; --log is a
SQLite file or a postgresql:// URL, see serving/logstore.py). Ground truth arrives later as CSV
or JSON lines with `request_id`, `label` and an optional `row` (the row of a multi-row request, 0
by default). `request_id` is the proxy's id (the X-Request-Id of its answer) or the X-Request-Id
the client sent, if that names one request in the window; the label is a class name or id, or a number for
regression. Every labelled row is scored against the answer the client got (the served
`class_ids`, so a threshold the proxy applied counts), per variant:

  binary      accuracy, AUC, log loss, predicted positive rate
  multiclass  accuracy, log loss
  regression  RMSE, MAE

beside requests, rows, labelled and unlabelled rows, errors (non-200 answers and 200 answers
whose predictions cannot be read) and latency p50/p99 of the answered requests.

B (the candidate) is then compared with A (the baseline). Two live variants see different
requests (independent samples); a shadow variant (--include_shadow, named "<variant>:shadow")
answers copies of the same requests, so B against the live variant is a paired comparison on the
rows both answered, which is far more sensitive:

  accuracy        two-proportion z-test, Newcombe (Wilson) CI  | McNemar exact test, Wald CI
  AUC             DeLong test                                   | paired DeLong test
  log loss, MAE   Welch t-test on per-row losses                | paired t-test
  RMSE            Welch t-test on squared errors                | paired t-test on squared errors
  error rate      Fisher exact test, one-sided (B higher)

The primary metric (--primary; AUC, accuracy or RMSE by default) decides; the task's other
metrics are guardrails (--guardrails): a significant loss on one of them blocks the release.
The decision, first match wins (printed with every report; --margin is absolute for accuracy
and AUC, relative to A's value for log loss, MAE and RMSE):

  NO-GO            B's error rate is higher than A's and Fisher's one-sided p < alpha
  NOT ENOUGH DATA  A or B has fewer than --min_samples labelled rows (paired: pairs), or the
                   primary metric is undefined (AUC with one class only)
  NO-GO            B is significantly worse on the primary metric (p < alpha)
  NO-GO            B is significantly worse on a guardrail metric (p < alpha / number of guardrails)
  GO               B is significantly better on the primary metric (p < alpha)
  GO               not significant, and the CI's worst case is within the margin (non-inferior)
  NOT ENOUGH DATA  not significant, and the CI still allows a loss larger than the margin

Exit codes: 0 GO, 1 NO-GO, 3 NOT ENOUGH DATA, 2 input error (the message names the file,
column or line at fault).
"""

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from typing import List, Optional, Tuple

from ops.ab.report import HIGHER_IS_BETTER, SHADOW_SUFFIX, InputError, build_report, render
from serving import logstore

INPUT_ERROR_EXIT = 2


# --- command line -------------------------------------------------------------------------

def parse_time(text: str) -> float:
    """Unix seconds or ISO 8601 (a time without a zone is UTC)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"'{text}' is not a time")
        return seconds
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither unix seconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def window(start: Optional[float], end: Optional[float], hours: Optional[float],
           now: Optional[float] = None) -> Tuple[Optional[float], Optional[float]]:
    if hours is None:
        return start, end
    if start is not None and end is not None:
        raise InputError("--window_hours with both --start and --end: give at most two of the three")
    if start is not None:
        return start, start + hours * 3600
    end = end if end is not None else (time.time() if now is None else now)
    return end - hours * 3600, end


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _metric_list(text: str) -> List[str]:
    return [] if text.strip() == "none" else [m.strip() for m in text.split(",") if m.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", default="build/prediction_log.sqlite",
                        help=f"the proxy's prediction log: {logstore.ACCEPTED_FORMS}")
    parser.add_argument("--labels", help="ground truth: CSV or JSON lines with request_id, label[, row]")
    parser.add_argument("--model", help="model name in the log (default: the only one in the window)")
    parser.add_argument("--a", default="stable", help="baseline variant (default: stable)")
    parser.add_argument("--b", default="canary", help="candidate variant (default: canary); "
                        f"with --include_shadow a shadow variant is '<name>{SHADOW_SUFFIX}'")
    parser.add_argument("--start", type=parse_time, help="window start: unix seconds or ISO 8601 (UTC if no zone)")
    parser.add_argument("--end", type=parse_time, help="window end (exclusive)")
    parser.add_argument("--window_hours", type=_positive(float), help="window length; ends at --end or now")
    parser.add_argument("--include_shadow", action="store_true",
                        help=f"add shadow answers as variants named '<variant>{SHADOW_SUFFIX}'")
    parser.add_argument("--primary", choices=sorted(HIGHER_IS_BETTER),
                        help="the metric that decides (default: auc binary, accuracy multiclass, rmse regression)")
    parser.add_argument("--guardrails", type=_metric_list,
                        help="metrics on which a significant loss is a NO-GO (Bonferroni over them), comma-separated, "
                             "or 'none' (default: every metric of the task but the primary)")
    parser.add_argument("--alpha", type=_positive(float), default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--margin", type=float, default=0.01,
                        help="largest acceptable loss on the primary metric: absolute for accuracy/AUC, a share of "
                             "A's value for log_loss/rmse/mae (default 0.01)")
    parser.add_argument("--min_samples", type=_positive(int), default=200,
                        help="labelled rows per variant (paired: pairs) needed for a decision (default 200)")
    parser.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",")],
                        help="class names in id order, for labels naming classes the answers never showed")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.margin < 0:
        parser.error(f"--margin must be >= 0, got {args.margin}")
    try:
        start, end = window(args.start, args.end, args.window_hours)
        report = build_report(args.log, args.labels, args.model, args.a, args.b, start, end, args.include_shadow,
                              args.primary, args.alpha, args.margin, args.min_samples, args.classes,
                              args.guardrails)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    print(render(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nreport written to {args.json}")
    return report["decision"]["exit_code"]


if __name__ == "__main__":
    sys.exit(main())

