import pytest

from cilia.ipam import Ipam, IpamExhausted


def test_leases_persist_and_are_never_handed_out_twice(tmp_path):
    path = tmp_path / "ipam.json"
    ipam = Ipam("10.0.0.0/29", path)
    a = ipam.allocate("c1/eth0")
    b = ipam.allocate("c2/eth0")
    assert a != b
    assert a not in ("10.0.0.0", "10.0.0.1", "10.0.0.7")  # network, node, broadcast
    again = Ipam("10.0.0.0/29", path)  # a restarted agent
    c = again.allocate("c3/eth0")
    assert c not in (a, b)
    assert again.allocate("c1/eth0") == a  # same owner, same address


def test_exhaustion_is_a_clear_error_and_release_frees(tmp_path):
    ipam = Ipam("10.0.0.0/29", tmp_path / "ipam.json")
    got = [ipam.allocate(f"c{i}/eth0") for i in range(5)]  # .2 .. .6
    assert len(set(got)) == 5
    with pytest.raises(IpamExhausted, match="no free address"):
        ipam.allocate("c9/eth0")
    assert ipam.release("c0/eth0") == [got[0]]
    assert ipam.release("c0/eth0") == []
    assert ipam.allocate("c9/eth0") == got[0]


def test_released_address_is_not_reused_at_once(tmp_path):
    ipam = Ipam("10.0.0.0/24", tmp_path / "ipam.json")
    a = ipam.allocate("a/eth0")
    ipam.release("a/eth0")
    assert ipam.allocate("b/eth0") != a


def test_cidr_change_with_leases_is_refused(tmp_path):
    Ipam("10.0.0.0/24", tmp_path / "ipam.json").allocate("a/eth0")
    with pytest.raises(ValueError, match="cannot change"):
        Ipam("10.1.0.0/24", tmp_path / "ipam.json")
