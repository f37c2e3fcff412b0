"""The names a runtime passes are checked by the CNI spec's rules before anything is
made from them (cilia/cnispec.py): before, `a/b`+`c` and `a`+`b/c` made the same lease owner,
and pod names became path components."""

import pytest

from cilia.cnispec import INVALID_ENV, CNIError, check_container_id, check_ifname, check_pod


@pytest.mark.parametrize("cid", ["abc", "0123456789abcdef" * 4, "a.b_c-d", "A9"])
def test_container_ids_the_spec_allows(cid):
    assert check_container_id(cid) == cid


@pytest.mark.parametrize("cid", ["", "a/b", "-a", ".a", "a b", "a:b", "a\nb", "../x", "é"])
def test_container_ids_the_spec_refuses(cid):
    with pytest.raises(CNIError) as err:
        check_container_id(cid)
    assert err.value.code == INVALID_ENV and "CNI_CONTAINERID" in err.value.msg


@pytest.mark.parametrize("name", ["eth0", "net1", "a" * 15, "e-t_h.0"])
def test_interface_names_the_spec_allows(name):
    assert check_ifname(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "a" * 16, "eth/0", "eth:0", "eth 0",
                                  "eth\t0"])
def test_interface_names_the_spec_refuses(name):
    with pytest.raises(CNIError) as err:
        check_ifname(name)
    assert err.value.code == INVALID_ENV and "CNI_IFNAME" in err.value.msg


def test_owners_cannot_collide():
    """The lease owner is "CONTAINER/IFNAME": with '/' refused in both, two attachments
    never share one."""
    for cid, ifname in (("a/b", "c"), ("a", "b/c")):
        with pytest.raises(CNIError):
            check_container_id(cid)
            check_ifname(ifname)


@pytest.mark.parametrize("ns,name", [("", ""), ("default", "web-0"), ("kube-system",
                                                                       "coredns-7d.x")])
def test_pod_references_allowed(ns, name):
    assert check_pod(ns, name) == (ns, name)


@pytest.mark.parametrize("ns,name", [("../etc", "p"), ("Default", "p"), ("ns", "p/../q"),
                                     ("ns", "P"), ("a" * 64, "p"), ("ns", "a" * 254)])
def test_pod_references_refused(ns, name):
    with pytest.raises(CNIError) as err:
        check_pod(ns, name)
    assert err.value.code == INVALID_ENV
