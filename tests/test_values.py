"""One value typing rule (components/values.coerce) and every caller agreeing with it: the data
check, batch prediction and the monitor take and refuse the same cells, with the same values."""

import copy
import math

import pytest

from components import feature_spec
from components.values import coerce

# (raw, column type, the value the model gets or None for missing, or the start of the reason)
CASES = [
    ("12.5", "float", 12.5), ("2", "float", 2.0), (" 7 ", "float", 7.0), ("1e3", "float", 1000.0),
    ("", "float", None), ("nan", "float", None), ("NaN", "float", None),  # NaN is missing, as in training
    ("inf", "float", "declared float: 'inf' is not finite"), ("-inf", "float", "declared float: '-inf' is not finite"),
    ("1e39", "float", "declared float: '1e39' is beyond float32's range"),
    ("abc", "float", "declared float: 'abc' is not a number"),
    ("300", "int", 300), ("+4", "int", 4), ("", "int", None),
    ("1.5", "int", "declared int: '1.5' is not an integer"), ("0x10", "int", "declared int: '0x10' is not an integer"),
    ("nan", "int", "declared int: 'nan' is not an integer"),
    (str(2 ** 53), "int", 2 ** 53), (str(-2 ** 53 - 1), "int", "declared int: -9007199254740993 is beyond 2**53"),
    ("Cash", "string", b"Cash"), ("", "string", None), ("nan", "string", b"nan"), ("Caf\xe9", "string", b"Caf\xc3\xa9"),
]


@pytest.mark.parametrize("raw, column_type, expected", CASES)
def test_coerce(raw, column_type, expected):
    for form in (raw, raw.encode("utf-8")):  # a str cell, or the UTF-8 bytes a CSV reader gives
        if isinstance(expected, str):
            with pytest.raises(ValueError, match="^" + expected.replace("*", r"\*").replace("+", r"\+")):
                coerce(form, column_type)
        else:
            value = coerce(form, column_type)
            assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw, column_type, expected", [
    (3, "int", 3), (3.0, "int", 3), (math.nan, "int", None), (math.nan, "float", None), (2, "float", 2.0),
    (None, "float", None), (2.5, "int", "declared int: 2.5 is not a whole number"),
    (True, "int", "declared int: True is a bool, not a number"), (10 ** 400, "float", "declared float:"),
    (2 ** 53 + 1, "int", "declared int: 9007199254740993 is beyond 2**53"),
    (math.inf, "float", "declared float: inf is not finite"), (3, "string", "declared string: 3 is a int"),
    (b"\xff", "string", "not valid UTF-8"),
])
def test_coerce_json_values(raw, column_type, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match="^" + expected.replace("*", r"\*")):
            coerce(raw, column_type)
    else:
        value = coerce(raw, column_type)
        assert value == expected and type(value) is type(expected)


SPEC = {
    "name": "small", "data": {"path": "PLACEHOLDER"}, "task": "binary",
    "label": {"name": "is_big", "column": "big"},
    "label_columns": {"big": {"type": "int", "missing": {"fill": 0}}},
    "features": {"count": {"type": "int", "transform": "zscore"},
                 "price": {"type": "float", "transform": "zscore"},
                 "city": {"type": "string", "transform": "vocabulary"}},
}
COLUMN = {"int": "count", "float": "price", "string": "city"}


@pytest.mark.parametrize("raw, column_type, expected", [c for c in CASES if "," not in c[0]])
def test_the_data_check_batch_prediction_and_the_monitor_agree(tmp_path, raw, column_type, expected):
    from ops import batch_predict, monitor

    column = COLUMN[column_type]
    cells = {"count": "1", "price": "1.0", "city": "paris", "big": "0", column: raw}
    header = ["count", "price", "city", "big"]
    (tmp_path / "a.csv").write_text(",".join(header) + "\n" + ",".join(cells[c] for c in header) + "\n",
                                    encoding="utf-8")
    raw_spec = copy.deepcopy(SPEC)
    raw_spec["data"]["path"] = str(tmp_path / "a.csv")
    spec = feature_spec.parse(raw_spec, source="small.yaml")
    types = {n: f.type for n, f in spec.features.items()}
    index = {n: header.index(n) for n in types}
    row = [cells[c].encode("utf-8") for c in header]
    values, problems = batch_predict.parse_row(row, len(header), index, types, frozenset())
    if isinstance(expected, str):
        with pytest.raises(feature_spec.SpecError, match=f"features.{column}.type: declared {column_type} "
                                                         f"but column '{column}' holds .* at .*a.csv:2"):
            feature_spec.check_against_data(spec)
        assert [(p["column"], p["reason"]) for p in problems] == [(column, str(_error(raw, column_type)))]
        with pytest.raises(ValueError):
            monitor.typed_rows([cells], spec)
    else:
        feature_spec.check_against_data(spec)
        assert problems == [] and values[column] == expected
        typed = monitor.typed_rows([cells], spec)[0]
        assert typed.get(column) == (None if expected is None else [expected])


def _error(raw, column_type):
    try:
        coerce(raw, column_type)
    except ValueError as e:
        return e
    raise AssertionError(f"{raw!r} was taken")
