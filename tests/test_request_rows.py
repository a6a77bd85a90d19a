"""The rows of a TF Serving request body: serving/wire.py's request_rows is the one reading, and
the proxy (row limit and fallback, unseen categories, log redaction) and the prediction log's
reader (logstore.instances) agree with it.

The forms are tensorflow_serving/util/json_tensor.cc's: FillTensorMapFromInstancesList (:537-613,
"instances" rows), FillTensorMapFromInputsMap (:615-660, "inputs" columns),
FillClassifyRegressRequestFromJson (:817-856, "examples" with an optional "context"), the context
merged into every example as apis/input.proto:66-68 (ExampleListWithContext) says and
servables/tensorflow/util.cc:183-200 does (serialized context, then the example: a key in both
keeps the example's value).
"""

import pytest

from serving import logstore, proxy, wire

CLASSIFY_WITH_CONTEXT = {"context": {"payment_type": "Bitcoin"},
                         "examples": [{"trip_miles": 1.5}, {"trip_miles": 3.0, "company": "Flash"}]}
COLUMNAR_SCALAR = {"inputs": {"payment_type": "Bitcoin", "trip_miles": [1.5, 3.0]}}

TABLE = [
    ({"instances": [{"a": 1}, {"a": 2}]}, [{"a": 1}, {"a": 2}]),
    ({"instances": [[1.0, 2.0], {"b64": "AA=="}]}, [[1.0, 2.0], {"b64": "AA=="}]),  # one unnamed input
    ({"inputs": {"a": [1, 2, 3], "b": ["x", "y", "z"]}}, [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}, {"a": 3, "b": "z"}]),
    (COLUMNAR_SCALAR, [{"payment_type": "Bitcoin", "trip_miles": 1.5}, {"payment_type": "Bitcoin", "trip_miles": 3.0}]),
    ({"inputs": {"a": 7}}, [{"a": 7}]),
    ({"inputs": {"a": [1, 2], "b": [5]}}, [{"a": 1, "b": 5}, {"a": 2}]),  # a short column leaves later rows without it
    ({"inputs": [[1.0], [2.0]]}, [[1.0], [2.0]]),  # one unnamed input, columnar
    ({"inputs": {"b64": "AA=="}}, [{"b64": "AA=="}]),  # a bytes value, not an object of inputs
    (CLASSIFY_WITH_CONTEXT, [{"payment_type": "Bitcoin", "trip_miles": 1.5},
                             {"payment_type": "Bitcoin", "trip_miles": 3.0, "company": "Flash"}]),
    ({"context": {"a": 1, "b": 2}, "examples": [{"b": 3}]}, [{"a": 1, "b": 3}]),  # the example's value wins
    ({"examples": [{"a": 1}]}, [{"a": 1}]),
    ({"instances": [{"a": 1}], "inputs": {"a": [2, 3]}}, [{"a": 1}]),  # TF Serving reads instances first
    ({"inputs": {}}, []), ({"instances": "x"}, []), ({"signature_name": "s"}, []), ([1, 2], []),
]


@pytest.mark.parametrize("body, rows", TABLE)
def test_the_rows_of_each_request_form(body, rows):
    assert wire.request_rows(body) == rows
    assert logstore.instances(body) == wire.feature_rows(body) == [r for r in rows if isinstance(r, dict) and "b64" not in r]
    assert proxy._row_count(body) == wire.request_row_count(body) == len(rows)


VOCABULARIES = {"payment_type": frozenset({"Cash", "Credit Card"}), "company": frozenset({"Flash Cab"})}


@pytest.mark.parametrize("body, unseen", [
    (CLASSIFY_WITH_CONTEXT, {"payment_type": 2, "company": 1}),  # the proxy counted {} here before
    (COLUMNAR_SCALAR, {"payment_type": 2}),  # once before, while the log read it on both rows
    ({"instances": [{"payment_type": ["Bitcoin"]}, {"payment_type": "Cash"}, {"payment_type": ""}]},
     {"payment_type": 1}),
])
def test_the_proxy_counts_unseen_categories_on_the_rows_the_log_reads(body, unseen):
    assert proxy.unseen_categories(body, VOCABULARIES) == unseen
    logged = logstore.instances(body)
    by_log = {name: sum(1 for r in logged if wire.one_element(r.get(name)) not in known | {"", None})
              for name, known in VOCABULARIES.items()}
    assert {k: v for k, v in by_log.items() if v} == unseen
    assert proxy._row_count(body) == len(logged)


@pytest.mark.parametrize("body", [CLASSIFY_WITH_CONTEXT, COLUMNAR_SCALAR,
                                  {"instances": [{"payment_type": "Bitcoin", "fare": 2.0}]},
                                  {"instances": [{"payment_type": "Bitcoin"}], "context": {"payment_type": "Cash"}}])
def test_a_redacted_body_keeps_its_rows_but_no_redacted_value(body):
    redacted = proxy._redact(body, {"payment_type"})
    assert "Bitcoin" not in repr(redacted) and "Cash" not in repr(redacted)
    original, kept = wire.request_rows(body), wire.request_rows(redacted)
    assert len(kept) == len(original)
    for before, after in zip(original, kept):
        assert after == {k: ("[redacted]" if k == "payment_type" else v) for k, v in before.items()}
    assert wire.request_rows(body) == original  # the body itself is left as it was
