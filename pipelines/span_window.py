"""Which spans a local run ingests before its own ExampleGen, and whether a retrain has data it has not
seen: the spec's span folders (FeatureSpec.spans, window_spans) against the spans ML Metadata says
CsvExampleGen ingested (pipelines.mlmd.ingested_spans). Light to import: a retrain with nothing new
is refused before TFX is imported.
"""

import sys
from typing import List

from pipelines import mlmd


class NothingNew(RuntimeError):
    """A retraining run was asked for, but there is no data it has not seen."""


def require_new_span(spec, env) -> int:
    """The newest span on disk, refused (NothingNew) when ExampleGen ingested it already: a retrain on
    data the model was trained on cannot answer drift."""
    if not spec.has_spans:
        raise NothingNew(f"{spec.source}: data.path '{spec.data_path}' is one dataset, not spans: retraining on "
                         "it again learns nothing new; point data.path at spans ({SPAN}, e.g. build/spans/"
                         "span-{SPAN}/, what make export-span writes)")
    spans = spec.spans()  # one glob of the span folders
    newest = spans[-1] if spans else None
    if newest is None:
        raise NothingNew(f"{spec.source}: no span matches '{spec.data_path}': export one with make export-span")
    if newest in mlmd.ingested_spans(env["metadata_path"]):
        raise NothingNew(f"span {newest} (the newest under '{spec.data_path}') was trained on already: export a new "
                         "span (make export-span) before retraining")
    return newest


def spans_to_ingest(spec, ingested) -> List[int]:
    """The window's spans (spec.window_spans(), what the run must train on) older than the newest that
    ExampleGen has not ingested, oldest first. A run's own ExampleGen ingests the newest span only
    (TFX 1.16), so spans that arrived together, or a first run over a folder of spans, would leave
    these out of the window TFX resolves; the local runner ingests them first (ingest_window_spans)."""
    if not spec.has_spans:
        return []
    seen = set(ingested)
    return [span for span in spec.window_spans()[:-1] if span not in seen]


def ingest_window_spans(spec, environment, metadata_path: str, out=sys.stdout) -> List[int]:
    """Runs pipelines.pipeline.span_ingestion_pipeline with LocalDagRunner for each of spans_to_ingest, one
    console line each, before the run's own pipeline; returns them."""
    from tfx.orchestration.local.local_dag_runner import LocalDagRunner

    from pipelines import pipeline as pipeline_lib

    spans = spans_to_ingest(spec, mlmd.ingested_spans(metadata_path))
    for span in spans:
        out.write(f"  ingesting span {span} of the window (older than the newest, never ingested)\n")
        out.flush()
        LocalDagRunner().run(pipeline_lib.span_ingestion_pipeline(spec, environment, span))
    return spans
