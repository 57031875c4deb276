"""Invalid sampling parameters raise ValueError naming the field."""
import math

import pytest

from fastinfer import SamplingParams

BAD = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("min_p", -0.1), ("min_p", 1.1),
    ("n", 0), ("n", 10_000), ("n", 2.0),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 3.5),
    ("min_tokens", -1),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("logprobs", -1), ("logprobs", 1000),
    ("seed", "abc"), ("seed", 1.5),
    ("stop", [""]), ("stop", 5), ("stop", ["x" * 1000]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_valid_values_and_off_switches():
    for k in (0, -1, 1, 50):
        SamplingParams(top_k=k)
    sp = SamplingParams(temperature=0, top_p=1.0, stop="###", stop_token_ids=[5], n=3, seed=7, logprobs=5)
    assert sp.greedy and sp.stop_strings == ["###"] and sp.stop_token_ids == [5]
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
