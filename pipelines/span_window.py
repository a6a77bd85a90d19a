"""Which spans a local run ingests before its own ExampleGen, and whether a retrain has data it has not
seen: the spec's span folders (FeatureSpec.spans, window_spans) against the spans ML Metadata says
CsvExampleGen ingested (pipelines.mlmd.ingested_spans). Light to import: a retrain with nothing new
is refused before TFX is imported.
"""

from typing import List

from pipelines import mlmd


# The exit code of a run refused for want of new data: make retrain's, and a Kubeflow ExampleGen pod's.
NOTHING_NEW_EXIT = 3


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
    these out of the window TFX resolves; the local runner ingests them first
    (pipelines/local_runner.py ingest_window_spans)."""
    if not spec.has_spans:
        return []
    seen = set(ingested)
    return [span for span in spec.window_spans()[:-1] if span not in seen]
