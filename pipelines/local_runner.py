"""Runs the pipeline with LocalDagRunner (SQLite metadata, Beam DirectRunner).

    python -m pipelines.local_runner --spec configs/taxi.yaml [--env configs/local.yaml]
        [--beam_profile direct_multi_processing]

Prints progress per component, then a summary; writes build/run_summary.json and HTML
reports (data statistics and anomalies, evaluation per slice) under build/reports/.
"""

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from components import feature_spec
from pipelines import beam_profiles, console, fingerprint, mlmd, span_window
from pipelines.environment import load_environment

SUMMARY_PATH = "build/run_summary.json"


def ingest_window_spans(spec, environment, metadata_path: str, out=sys.stdout) -> List[int]:
    """Runs pipelines.pipeline.span_ingestion_pipeline with LocalDagRunner for each of spans_to_ingest, one
    console line each, before the run's own pipeline; returns them."""
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines import pipeline as pipeline_lib

    spans = span_window.spans_to_ingest(spec, mlmd.ingested_spans(metadata_path))
    for span in spans:
        out.write(f"  ingesting span {span} of the window (older than the newest, never ingested)\n")
        out.flush()
        LocalDagRunner().run(pipeline_lib.span_ingestion_pipeline(spec, environment, span))
    return spans


def run(spec_path: str, env_path: str = "configs/local.yaml", data_path: Optional[str] = None,
        summary_path: str = SUMMARY_PATH, report_dir: Optional[str] = None, quiet: bool = False,
        check_data: bool = True, beam_profile: Optional[str] = None, new_span_only: bool = False,
        reuse_unchanged: bool = False) -> Dict:
    """Runs the whole pipeline once; returns the run summary (also written as JSON).

    `beam_profile` (a configs/beam/ name) replaces the environment file's `beam_profile:`.
    `reuse_unchanged`: when nothing the run reads changed since the summary at summary_path was
    written (pipelines/fingerprint.py), that summary is the answer and TFX is not started.
    """
    started = time.time()
    spec = feature_spec.load(spec_path)
    if data_path:
        spec = dataclasses.replace(spec, data_path=feature_spec.resolve_path(data_path))
    if check_data:
        feature_spec.check_against_data(spec)  # fail in a second, not after ExampleGen
    env = load_environment(env_path, spec)
    if new_span_only:
        span_window.require_new_span(spec, env)
    inputs = fingerprint.inputs_fingerprint(spec, spec_path, env_path, beam_profile)
    if reuse_unchanged and not new_span_only:
        previous, _ = fingerprint.unchanged_run(summary_path, inputs, also_needed=[env["metadata_path"]])
        if previous is not None:
            if not quiet:
                print(f"skewless: nothing changed since the last run of '{spec.name}' (same spec, environment, "
                      f"data and code; its outputs are in place): {summary_path} stands. `--force` runs anyway.")
            return previous
    beam_args = beam_profiles.beam_args(env, env_path, beam_profile, pipeline_root=env["pipeline_root"],
                                        name=spec.name)
    beam_profiles.check_flags(beam_args, env_path)  # Beam would drop a misspelt flag with a warning
    log_path = console.log_path_for(summary_path, spec.name)
    report_dir = report_dir or os.path.join(os.path.dirname(os.path.abspath(summary_path)), "reports")
    if not quiet:
        print(f"skewless: running pipeline '{spec.name}' on {spec.data_path}", flush=True)
    error, failed = None, None
    with console.Console(log_path, quiet) as terminal:
        from tfx.orchestration import metadata
        from tfx.orchestration.local.local_dag_runner import LocalDagRunner

        from pipelines import pipeline as pipeline_lib, report

        os.makedirs(os.path.dirname(env["metadata_path"]), exist_ok=True)
        environment = pipeline_lib.Environment(
            pipeline_root=env["pipeline_root"], model_repository=env["model_repository"],
            metadata_connection_config=metadata.sqlite_metadata_connection_config(env["metadata_path"]),
            beam_pipeline_args=beam_profiles.for_tfx(beam_args), enable_cache=env.get("enable_cache", True),
            sandbox=dict(env.get("sandbox") or {}), **({"baseline": env["baseline"]} if env.get("baseline") else {}))
        tfx_pipeline = pipeline_lib.create_pipeline(spec, environment)
        try:  # before the run's progress watcher, which reports the run's own components
            ingest_window_spans(spec, environment, env["metadata_path"], terminal.out)
        except Exception as e:
            logging.exception("ingesting the window's spans failed")
            raise terminal.fail("CsvExampleGen (a span of the window)", e) from e
        with console.ProgressWatcher(environment.metadata_connection_config, stream=terminal.out) as progress:
            try:
                LocalDagRunner().run(tfx_pipeline)
            except Exception as e:  # reported in the summary, printed once below, then re-raised
                error = e
                logging.exception("the run failed")  # the traceback, in the log only
        commit = fingerprint.code_commit()
        if commit:  # the release log's lineage names the code
            mlmd.tag_latest_run(environment.metadata_connection_config, mlmd.CODE_COMMIT, commit)
        summary = report.build_summary(spec, env, environment, progress.order, progress.seconds,
                                       time.time() - started, error)
        summary["log"] = log_path
        summary[fingerprint.KEY] = inputs
        try:
            summary["reports"] = report.write_html(summary, spec, report_dir)
        finally:  # written once, with the reports when they could be made
            report.write_summary(summary, summary_path)
        if error is not None:
            failed = terminal.fail(progress.failed or "pipeline", error, summary.get("reports"))
    if failed is not None:
        raise failed from error
    if not quiet:
        report.print_summary(summary)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="configs/taxi.yaml")
    parser.add_argument("--env", default="configs/local.yaml")
    parser.add_argument("--data", help="override the spec's data.path (a CSV file or folder)")
    parser.add_argument("--summary", default=SUMMARY_PATH)
    parser.add_argument("--beam_profile", help="a Beam profile of configs/beam/ in place of the environment file's "
                                               f"(one of {', '.join(beam_profiles.profile_names())})")
    parser.add_argument("--require_new_span", action="store_true",
                        help="retraining: refuse unless the newest span was never ingested (make retrain)")
    parser.add_argument("--force", action="store_true",
                        help="run even when nothing changed since the last run (pipelines/fingerprint.py)")
    args = parser.parse_args(argv)
    try:
        run(args.spec, args.env, args.data, args.summary, beam_profile=args.beam_profile,
            new_span_only=args.require_new_span, reuse_unchanged=not args.force)
    except feature_spec.SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except span_window.NothingNew as e:
        print(f"nothing to retrain on: {e}", file=sys.stderr)
        return span_window.NOTHING_NEW_EXIT
    except console.RunFailed:  # run() printed it, cause first
        return 1
    except Exception as e:
        print(f"error: pipeline failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
