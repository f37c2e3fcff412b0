"""The agent's state files: what is written reads back the same, a person can read it
line by line, and a damaged file is moved aside, not crashed on."""

import json

import pytest

from cilia.statefile import encode, read_json, write_json

SHAPES = [
    {"endpoints": [{"id": 1, "labels": {"app": "a"}, "ip": "10.0.0.2"}, {"id": 2}]},
    {"cidr": "10.244.1.0/24", "leases": {"10.244.1.2": "c1/eth0"}, "last": "10.244.1.2"},
    {"endpoints": [], "leases": {}, "none": None, "n": 3},
    {}, [], [1, {"a": [2]}], "text", 0,
]


@pytest.mark.parametrize("data", SHAPES)
def test_what_is_written_reads_back_the_same(tmp_path, data):
    path = tmp_path / "state" / "endpoints.json"
    write_json(path, data)
    assert read_json(path, None) == data
    assert json.loads(encode(data)) == data
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_each_record_on_a_line_of_its_own(tmp_path):
    """`cat endpoints.json | grep POD` finds a pod's whole record on one line."""
    records = [{"id": i, "pod_name": f"pod-{i}", "labels": {"app": "web"}} for i in range(3)]
    text = encode({"endpoints": records, "leases": {"10.0.0.2": "a", "10.0.0.3": "b"}})
    lines = text.splitlines()
    for r in records:
        assert [json.loads(line.strip().rstrip(",")) for line in lines
                if f'"pod-{r["id"]}"' in line] == [r]
    assert '    "10.0.0.3": "b"' in lines
    assert lines[0] == "{" and lines[-1] == "}"


def test_a_damaged_file_is_moved_aside(tmp_path):
    path = tmp_path / "ipam.json"
    path.write_text('{"leases": ')
    assert read_json(path, {"leases": {}}) == {"leases": {}}
    assert not path.exists()
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.iterdir()] == ["ipam.json"]
