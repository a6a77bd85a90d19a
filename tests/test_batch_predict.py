"""Batch prediction: a CSV through Beam RunInference equals the online REST answers, row for row."""

import dataclasses
import glob
import json
import math
import os
import shutil
import urllib.request

import numpy as np
import pytest

from tests.conftest import write_models_config

# Before apache_beam is imported: it puts IPython/extensions on sys.path, whose regular `tests`
# package would then shadow this namespace package.
from tests.conftest import write_sample  # isort: skip
from ops import batch_predict  # isort: skip

IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
VERSION = 3


@pytest.fixture(scope="module")
def repository(small_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_repository")
    shutil.copytree(small_model[0], root / "taxi" / str(VERSION))
    return str(root)


@pytest.fixture(scope="module")
def server_url(repository):
    from tests.conftest import serve

    server = serve(repository)
    yield server.url
    server.stop()


def _rest_predictions(url, rows, spec):
    """What an online client gets for these CSV rows, sent in the one wire form (every feature;
    NaN for a missing number, "" for a missing string)."""
    instances = [{name: (r[name] if f.type == "string" else float(r[name]) if r[name] != "" else math.nan)
                  for name, f in spec.features.items()} for r in rows]
    predictions = []
    for start in range(0, len(instances), 100):
        body = json.dumps({"instances": instances[start:start + 100]}).encode()
        request = urllib.request.Request(f"{url}/v1/models/taxi/versions/{VERSION}:predict", data=body)
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions.extend(json.loads(response.read())["predictions"])
    return predictions


def _read_jsonl(folder, name):
    out = []
    for path in sorted(glob.glob(os.path.join(folder, f"{name}-*-of-*.jsonl"))):
        with open(path) as f:
            out.extend(json.loads(line) for line in f)
    return out


# --- the whole job against the online path -----------------------------------------------------

def test_batch_predictions_equal_rest_predictions_row_for_row(repository, server_url, taxi_spec, taxi_rows, tmp_path):
    rows = [dict(r) for r in taxi_rows[1500:1800]]
    # Beyond the gaps the data has (company, census tracts, coordinates), empty a few more cells,
    # one row with every optional feature empty.
    rows[0]["fare"], rows[1]["trip_seconds"], rows[2]["trip_start_hour"] = "", "", ""
    rows[3].update({name: "" for name, f in taxi_spec.features.items() if not f.required})
    rows[4]["company"] = 'Two-line "quoted"\ncompany'  # a quoted cell across lines is one value
    with_gaps = sum(any(r[n] == "" for n in taxi_spec.features) for r in rows)
    assert with_gaps > 100  # the comparison covers the missing-value path, not only full rows
    csv_path = write_sample(rows, str(tmp_path), "rows.csv")
    out = str(tmp_path / "out")

    summary = batch_predict.run("taxi", csv_path, out, repository, beam_args=IN_MEMORY, max_batch_size=64)

    assert (summary["version"], summary["rows_read"], summary["rows_predicted"], summary["rows_with_errors"]) == (
        VERSION, len(rows), len(rows), 0)
    assert _read_jsonl(out, "errors") == []
    batch = {p["row"]: p for p in _read_jsonl(out, "predictions")}
    assert sorted(batch) == list(range(len(rows)))  # one output per input row, none twice
    rest = _rest_predictions(server_url, rows, taxi_spec)
    assert len(rest) == len(rows)
    largest = 0.0
    for i, online in enumerate(rest):
        offline = batch[i]
        assert set(offline) == {"row"} | set(online), (i, offline)
        assert (offline["classes"], offline["class_ids"]) == (online["classes"], online["class_ids"]), i
        diff = np.abs(np.array(offline["probabilities"] + [offline["score"]])
                      - np.array(online["probabilities"] + [online["score"]])).max()
        largest = max(largest, float(diff))
    assert largest <= 1e-6, f"largest difference from REST: {largest:.3g}"
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["rows_predicted"] == len(rows)


def test_bad_rows_go_to_errors_naming_row_and_column_and_the_job_fails(repository, taxi_rows, tmp_path, capsys):
    header = list(taxi_rows[0])
    good = [dict(r) for r in taxi_rows[1500:1520]]
    bad = {
        "fare": ("abc", "declared float: 'abc' is not a number"),
        "trip_seconds": ("1.5", "declared int: '1.5' is not an integer"),
        "payment_type": ("", "required feature is empty"),
        "trip_miles": ("inf", "not finite"),
        "trip_start_timestamp": (str(2 ** 53 + 1), "beyond 2**53"),
    }
    lines = [",".join(header).encode()]
    lines += [",".join(r[c] for c in header).encode() for r in good]
    expected = {}
    for column, (value, reason) in bad.items():
        row = dict(taxi_rows[1600], **{column: value})
        expected[len(lines) - 1] = (column, reason)
        lines.append(",".join(row[c] for c in header).encode())
    expected[len(lines) - 1] = ("company", "not valid UTF-8")
    lines.append(",".join(taxi_rows[1601][c] if c != "company" else "Caf\xe9" for c in header).encode("latin-1"))
    expected[len(lines) - 1] = (None, f"the row has 3 cells, the header has {len(header)}")
    lines.append(b"1,2,3")
    last_good = len(lines) - 1  # the row after the blank line
    lines.append(b"")  # a blank line is not a row
    lines.append(",".join(taxi_rows[1602][c] for c in header).encode())
    csv_path = tmp_path / "bad.csv"
    csv_path.write_bytes(b"\n".join(lines) + b"\n")
    out = str(tmp_path / "out")

    code = batch_predict.main(["--model", "taxi", "--input", str(csv_path), "--output", out,
                               "--model_repository", repository, *IN_MEMORY])

    assert code == 1
    stderr = capsys.readouterr().err
    assert f"{len(expected)} rows refused, more than --max_errors 0" in stderr
    assert "row 20 (line 22): column 'fare': declared float: 'abc' is not a number" in stderr
    errors = {e["row"]: e for e in _read_jsonl(out, "errors")}
    assert sorted(errors) == sorted(expected)
    for row, (column, reason) in expected.items():
        (problem,) = errors[row]["problems"]
        assert problem["column"] == column and reason in problem["reason"], (row, problem)
        assert errors[row]["line"] == row + 2  # header on line 1, no blank line before these rows
    assert errors[20]["problems"][0]["value"] == "abc"
    predicted = sorted(p["row"] for p in _read_jsonl(out, "predictions"))
    assert predicted == list(range(len(good))) + [last_good]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["rows_read"] == len(good) + len(expected) + 1 == summary["rows_predicted"] + summary["rows_with_errors"]


def test_records_and_cells_are_the_ones_csv_example_gen_reads(tmp_path):
    """The reference is CsvExampleGen's own reader and parser (tfx/components/example_gen/
    csv_example_gen/executor.py: _ReadCsvRecordsFromTextFile joins lines until quotes balance;
    tfx_bsl's ParseCSVLine splits a record into cells)."""
    from tfx.components.example_gen.csv_example_gen import executor as csv_executor
    from tfx_bsl.coders import csv_decoder

    text = ('fare,company,payment_type\n'
            '1.5,"Two-line ""quoted""\ncompany",Cash\n'
            '\n'
            '2,plain,"Credit Card"\r\n'
            '3,"a, comma",\n')
    path = tmp_path / "tricky.csv"
    path.write_bytes(text.encode())

    ours = list(batch_predict._ReadRecords().process(str(path)))
    theirs = [r for r in csv_executor._ReadCsvRecordsFromTextFile().process(str(path)) if r.strip("\r\n")]
    assert [record.decode() for _, _, record in ours] == theirs
    assert [(row, line) for row, line, _ in ours] == [(0, 2), (1, 5), (2, 6)]  # line 4 is blank

    reference = csv_decoder.ParseCSVLine(",")
    reference.setup()
    parse = batch_predict._ParseRows(3, {"fare": 0, "company": 1, "payment_type": 2},
                                     {"fare": "float", "company": "string", "payment_type": "string"}, frozenset())
    parse.setup()
    for (_, _, record), line in zip(ours, theirs):
        cells, problems = batch_predict.record_cells(parse._parser, record, parse.index)
        assert problems == [] and cells == next(reference.process(line))[0]
    assert cells == [b"3", b"a, comma", b""]


def test_an_unclosed_quote_names_the_file_and_the_line_it_opens_on(tmp_path):
    path = tmp_path / "open.csv"
    path.write_bytes(b'fare,company\n1,ok\n2,"never closed\n3,x\n')
    with pytest.raises(ValueError, match=r"open\.csv: line 3: a quoted cell is never closed"):
        list(batch_predict._ReadRecords().process(str(path)))


# --- what is checked before a job starts ----------------------------------------------------------

SIMPLE_TYPES = {"fare": "float", "trip_seconds": "int", "payment_type": "string"}
SIMPLE_INDEX = {"fare": 0, "trip_seconds": 1, "payment_type": 2}


@pytest.mark.parametrize("cells,problem", [
    ([b"12.5", b"300", b"Cash"], None),
    ([b"", b"", b"Cash"], None),
    ([b" 7 ", b"+4", b"Cash"], None),
    ([b"nan", b"1", b"Cash"], None),  # NaN is a missing value, as in training (components/values.py)
    ([b"1e39", b"1", b"Cash"], ("fare", "beyond float32's range")),
    ([b"-inf", b"1", b"Cash"], ("fare", "not finite")),
    ([b"1", b"-9007199254740993", b"Cash"], ("trip_seconds", "beyond 2**53")),
    ([b"1", b"0x10", b"Cash"], ("trip_seconds", "declared int: '0x10' is not an integer")),
    ([b"1", b"1", b""], ("payment_type", "required feature is empty")),
    ([b"1", b"1", b"\xff"], ("payment_type", "not valid UTF-8")),
    ([b"1", b"1"], (None, "the row has 2 cells, the header has 3")),
])
def test_parse_row_refuses_what_the_online_path_cannot_take(cells, problem):
    values, problems = batch_predict.parse_row(cells, 3, SIMPLE_INDEX, SIMPLE_TYPES, frozenset({"payment_type"}))
    if problem is None:
        assert problems == [] and set(values) == set(SIMPLE_TYPES)
        assert all((v is None) == (c in (b"", b"nan")) for v, c in zip(values.values(), cells))
    else:
        assert len(problems) == 1 and problems[0]["column"] == problem[0] and problem[1] in problems[0]["reason"]


def test_missing_cells_reach_the_signature_as_missing_values():
    import tensorflow as tf

    from components.export import raw_inputs

    values, _ = batch_predict.parse_row([b"", b"", b"Cash"], 3, SIMPLE_INDEX, SIMPLE_TYPES, frozenset())
    example = tf.train.Example.FromString(batch_predict.to_example(values, SIMPLE_TYPES))
    # CsvExampleGen's encoding: the feature is there with an empty list of its type.
    assert example.features.feature["fare"].WhichOneof("kind") == "float_list"
    assert list(example.features.feature["fare"].float_list.value) == []
    specs = {"fare": tf.TensorSpec([None], tf.float32), "trip_seconds": tf.TensorSpec([None], tf.float64),
             "payment_type": tf.TensorSpec([None], tf.string)}
    columns = raw_inputs([example.SerializeToString()], specs)
    assert math.isnan(columns["fare"].numpy()[0]) and math.isnan(columns["trip_seconds"].numpy()[0])
    assert columns["payment_type"].numpy()[0] == b"Cash"


def test_the_model_is_resolved_and_checked_before_the_job(repository, taxi_spec, tmp_path):
    assert batch_predict.resolve_version(repository, "taxi") == VERSION
    with pytest.raises(batch_predict.BatchPredictError, match=r"version 9 is not pushed .*\(pushed: 3\)"):
        batch_predict.resolve_version(repository, "taxi", 9)
    with pytest.raises(batch_predict.BatchPredictError, match=r"models.config: (cannot read the model config|model 'taxi' has no label 'stable')"):
        batch_predict.resolve_version(repository, "taxi", label="stable")
    with pytest.raises(batch_predict.BatchPredictError, match="model 'nope': no folder"):
        batch_predict.resolve_version(repository, "nope")

    contract = batch_predict.load_contract(repository, "taxi", VERSION)
    assert contract.types == {n: f.type for n, f in taxi_spec.features.items()}
    assert contract.required == {"payment_type"}
    batch_predict.check_spec(taxi_spec, contract)
    fare = dataclasses.replace(taxi_spec.features["fare"], type="int")
    changed = dataclasses.replace(taxi_spec, features={**taxi_spec.features, "fare": fare})
    with pytest.raises(batch_predict.BatchPredictError, match="features.fare.type: the spec declares int, "
                                                              "the model takes float"):
        batch_predict.check_spec(changed, contract)

    no_fare = tmp_path / "no_fare.csv"
    no_fare.write_text("trip_miles,payment_type\n1.0,Cash\n")
    header = batch_predict.read_header(str(no_fare))
    with pytest.raises(batch_predict.BatchPredictError, match=r"no_fare.csv: column '\w+' is not in the header"):
        batch_predict.column_index(header, contract, str(no_fare))


def test_a_label_picks_its_version(tmp_path):
    for version in (4, 5, 6):
        (tmp_path / "taxi" / str(version)).mkdir(parents=True)
        (tmp_path / "taxi" / str(version) / "saved_model.pb").write_bytes(b"")
    write_models_config(tmp_path, {"taxi": {"stable": 5, "canary": 7}})
    assert batch_predict.resolve_version(str(tmp_path), "taxi") == 6
    assert batch_predict.resolve_version(str(tmp_path), "taxi", label="stable") == 5
    with pytest.raises(batch_predict.BatchPredictError, match=r"version 7 is not pushed .*\(pushed: 4, 5, 6\)"):
        batch_predict.resolve_version(str(tmp_path), "taxi", label="canary")


def test_cli_reports_what_stops_a_job_without_a_traceback(repository, tmp_path, capsys):
    args = ["--model", "taxi", "--output", str(tmp_path / "out"), "--model_repository", repository]
    assert batch_predict.main(args + ["--input", str(tmp_path / "absent.csv")]) == 2
    assert f"no file at '{tmp_path / 'absent.csv'}'" in capsys.readouterr().err
    # A mistyped option must not fall through to Beam and be dropped (scoring the latest version).
    assert batch_predict.main(args + ["--input", str(tmp_path / "absent.csv"), "--verison", "3"]) == 2
    assert "unknown argument --verison" in capsys.readouterr().err


def test_a_batch_answer_is_the_text_rest_writes_for_that_row():
    import base64

    from apache_beam.ml.inference.base import PredictionResult

    from serving import json_tensor

    outputs = {"classes": np.array([[b"0", b"1"], [b"\xff\xfe", b"1"]], dtype=object),
               "probabilities": np.array([[0.1, 0.9], [1 / 3, 2 / 3]], dtype=np.float32),
               "score": np.array([[0.123456789], [2.0]], dtype=np.float64)}
    rest = json_tensor.predict_response(outputs, "row").decode()
    fmt = batch_predict._FormatPrediction()
    for i in range(2):
        (line,) = fmt.process(((i, i + 2), PredictionResult(b"", {k: v[i] for k, v in outputs.items()})))
        assert line.startswith('{"row": %d, ' % i)
        row_text = "{" + line[len('{"row": %d, ' % i):]
        assert row_text in rest  # the same digits and the same escapes as the REST answer
        assert json.loads(line)["probabilities"] == json.loads(rest)["predictions"][i]["probabilities"]
    assert json.loads(line)["classes"][0] == {"b64": base64.b64encode(b"\xff\xfe").decode()}  # not backslashreplace
    assert '"score": [0.123456789]' in rest and "2.0" in rest

    (refused,) = fmt.process(((5, 9), PredictionResult(b"", {"score": np.array([np.nan])})))
    assert refused.tag == batch_predict.ERRORS
    assert refused.value["row"] == 5 and refused.value["line"] == 9
    assert "output 'score' is nan" in refused.value["problems"][0]["reason"]
    assert batch_predict.describe(refused.value).startswith("row 5 (line 9): the model's answer cannot be sent")
