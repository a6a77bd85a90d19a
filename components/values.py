"""One value of a declared column, as the model will see it: `coerce(raw, type)`.

The single owner of value typing beside the spec. The data check (feature_spec.check_against_data),
batch prediction (ops/batch_predict.py) and the monitor (ops/monitor.py) call it, so a value
one of them takes is taken by all, and means the same.

`raw` is a CSV cell (str, or UTF-8 bytes) or a JSON value from a request. The result is None
for a missing value, an int, a float or UTF-8 bytes; ValueError names the type and the reason.

The rules, from what the two ends of the path do:
- A cell is parsed as tfx_bsl's CSV decoder parses it for CsvExampleGen (coders/csv_decoder.py:
  `int(cell)` for INT, `float(cell)` for FLOAT, the bytes for STRING), so "+4", " 7 " and "1e3"
  read as they do in training, and "0x10" or "1.5" are not ints.
- The empty cell is missing (CsvExampleGen writes an empty feature list); so is NaN, in a cell
  ("nan") or in JSON: tfx_bsl's float() reads "nan" as NaN, TF Serving's json_tensor.cc parses
  NaN (kParseNanAndInfFlag), and the model treats NaN as missing (components/preprocessing.py,
  components/export.py), so all three paths already agree on it.
- Infinity and floats beyond float32's range (which float32 turns into infinity) are refused: both
  ends would accept them, and the model would answer NaN (which no JSON answer can carry).
- An int beyond 2**53 in magnitude is refused: serving_default takes int columns as float64
  (components/export.py SERVING_DTYPES), which carries every int exactly only up to 2**53, so
  training (int64) and serving would see different values.
- JSON: a bool is not a number; an int column takes a float only when it is whole (3.0).
"""

import math
from typing import Any, Optional, Union

MAX_EXACT_INT = 2 ** 53  # the largest magnitude float64 (the signature's int dtype) holds exactly
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max, without importing numpy

Value = Optional[Union[int, float, bytes]]


def coerce(raw: Any, column_type: str) -> Value:
    """The value of `raw` in a column declared `column_type` (int | float | string); None if missing."""
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not valid UTF-8") from None
    if column_type == "string":
        if not isinstance(raw, str):
            raise ValueError(f"declared string: {raw!r} is a {type(raw).__name__}, not a string")
        return raw.encode("utf-8") if raw != "" else None
    if column_type not in ("int", "float"):
        raise ValueError(f"unknown column type '{column_type}' (use int, float or string)")
    if isinstance(raw, str):
        if raw == "":
            return None
        value = _parse(raw, column_type)
    elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"declared {column_type}: {raw!r} is a {type(raw).__name__}, not a number")
    else:
        value = raw
    if isinstance(value, float) and math.isnan(value):
        return None
    if column_type == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"declared int: {raw!r} is not a whole number")
            value = int(value)
        if abs(value) > MAX_EXACT_INT:
            raise ValueError(f"declared int: {value} is beyond 2**53, which the online path (float64) cannot carry "
                             f"exactly (declare the column string if it is an id)")
        return value
    try:
        value = float(value)
    except OverflowError:  # an int too large for any float
        raise ValueError(f"declared float: {raw!r} is beyond float32's range") from None
    if not math.isfinite(value):
        raise ValueError(f"declared float: {raw!r} is not finite (leave the cell empty for a missing value)")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"declared float: {raw!r} is beyond float32's range")
    return value


def _parse(text: str, column_type: str) -> Union[int, float]:
    if column_type == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"declared int: {text!r} is not an integer") from None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"declared float: {text!r} is not a number") from None
