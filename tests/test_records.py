import json

import pytest

from if_query.data.records import load_examples
from if_query.errors import InputError


def write(tmp_path, text, name="records.json", binary=False):
    path = tmp_path / name
    path.write_bytes(text) if binary else path.write_text(text, encoding="utf-8")
    return path


def test_loads_list_and_keeps_extra_fields_in_order(tmp_path):
    path = write(tmp_path, json.dumps([{"pair_id": "a", "z": 1, "prompt": "p", "completion": " c", "b": [1]}]))
    [example] = load_examples(path)
    assert (example.pair_id, example.prompt, example.completion) == ("a", "p", " c")
    assert list(example.extra.items()) == [("z", 1), ("b", [1])]


def test_loads_json_lines(tmp_path):
    lines = "\n".join(json.dumps({"pair_id": str(i), "prompt": "", "completion": "x"}) for i in range(3))
    assert [e.pair_id for e in load_examples(write(tmp_path, lines + "\n", "r.jsonl"))] == ["0", "1", "2"]


def test_unicode_round_trips(tmp_path):
    text = "emoji 😀, right-to-left עברית, control \u0007 tab\t"
    [example] = load_examples(write(tmp_path, json.dumps([{"pair_id": "u", "prompt": text, "completion": text}])))
    assert example.prompt == text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("{not json", "invalid JSON"),
        ('{"pair_id": "a"}', "expected a JSON list"),
        ("[]", "no records"),
        ("[1]", "record 0: expected a JSON object"),
        ('[{"prompt": "p", "completion": "c"}]', "missing field 'pair_id'"),
        ('[{"pair_id": "a", "completion": "c"}]', "record 0 (pair_id 'a'): missing field 'prompt'"),
        ('[{"pair_id": "a", "prompt": 3, "completion": "c"}]', "field 'prompt' must be a string"),
        ('[{"pair_id": "", "prompt": "p", "completion": "c"}]', "empty pair_id"),
        ('[{"pair_id": "a", "prompt": "p", "completion": ""}]', "empty completion"),
        ('[{"pair_id": "a", "prompt": "p", "completion": "c"}, {"pair_id": "a", "prompt": "p", "completion": "c"}]',
         "record 1 (pair_id 'a'): duplicate pair_id"),
    ],
)
def test_bad_records_name_file_record_and_problem(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(InputError) as error:
        load_examples(path)
    assert str(path) in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_examples(tmp_path / "nope.json")
    with pytest.raises(InputError, match="not UTF-8"):
        load_examples(write(tmp_path, b"\xff\xfe[]", binary=True))
