"""One strict-JSON conversion for every file anyorder writes: non-finite floats become null."""

import json
import math

from anyorder.core.files import json_safe, strict_json_bytes


def test_non_finite_floats_become_null_everywhere_and_strings_stay() -> None:
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": "NaN and Infinity", "d": 3}
    data = json.loads(strict_json_bytes(value))
    assert data == {"a": None, "b": [1.5, None, [None, 2]], "c": "NaN and Infinity", "d": 3}
    assert json_safe((math.nan,)) == [None]

