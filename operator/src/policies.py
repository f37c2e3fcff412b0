"""Policy validation: say, where people look, which policies cilia cannot enforce.

The agents already refuse such a policy (the pods it selects stay isolated in the
directions it names); the operator tells the policy's author once, cluster-wide:

- NetworkPolicy (no status of its own): a Warning Event naming the field, from
  `cilia.policy.model.parse_network_policy`; a Normal Event once it is fixed.
- CiliaNetworkPolicy and CiliaClusterwideNetworkPolicy: status.conditions[type=Valid]
  (True, or False with the field in the message, and the generation it is about), and a
  Warning Event when it turns invalid. Checked by the agents' own parser,
  `cilia.policy.cilia_model.parse_cilia_policy`, so operator and agents always agree.
- ClusterNetworkPolicy (sig-network's admin policy API): the same, with the API's own
  condition, status.conditions[type=Accepted] (True, reason Accepted, with the parser's
  warnings when cilia fails closed on a part of it; or False, reason Invalid), from
  `cilia.policy.cnp_model.parse_cluster_network_policy`.

Only changes are written: a status that already says the same is not patched again (the
operator's own patch comes back as a watch event and must not loop).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import kopf

from cilia.datastore.kubernetes import (
    CILIA_CLUSTER_POLICIES,
    CILIA_POLICIES,
    CLUSTER_NETWORK_POLICIES,
    KubeClient,
)
from cilia.operator.events import NORMAL, WARNING, EventPoster, now, plain
from cilia.policy import PolicyError
from cilia.policy.cilia_model import parse_cilia_policy
from cilia.policy.cnp_model import parse_cluster_network_policy
from cilia.policy.model import parse_network_policy

log = logging.getLogger(__name__)


def checked(fn: Callable[[dict], object], obj: dict) -> tuple[PolicyError | None, list[str]]:
    """The parser's verdict on `obj`: its error, or None and its warnings."""
    try:
        parsed = fn(obj)
    except PolicyError as err:
        return err, []
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        # A parser that trips over a malformed object: still invalid, still reported.
        return PolicyError("spec", f"cannot be parsed: {err}"), []
    return None, list(getattr(parsed, "warnings", None) or [])


def validity(fn: Callable[[dict], object], obj: dict) -> PolicyError | None:
    return checked(fn, obj)[0]


@dataclass(frozen=True)
class Condition:
    """The status condition a policy kind carries about whether cilia enforces it."""

    type: str
    accepted_reason: str
    accepted_message: str
    consequence: str  # of an invalid policy, in the Warning Event after the error
    invalid_reason: str = "Invalid"
    consequence_in_status: bool = False  # and in the condition's message
    warnings: bool = False  # the parser's warnings appended to the accepted message

    def wanted(self, error: PolicyError | None, warnings: list[str], generation: int) -> dict:
        if error is not None:
            status, reason = "False", self.invalid_reason
            message = (f"{error} ({self.consequence})" if self.consequence_in_status
                       else str(error))
        else:
            status, reason, message = "True", self.accepted_reason, self.accepted_message
            if self.warnings and warnings:
                message += f", with warnings: {'; '.join(warnings)}"
        return {"type": self.type, "status": status, "reason": reason,
                "message": message[:32768], "observedGeneration": generation}


# cilia's own policies: Valid (cilia.io CRDs, docs/crds.md).
VALID = Condition("Valid", "Valid", "cilia can enforce the policy",
                  "cilia cannot enforce this policy: the pods it selects stay isolated in "
                  "the directions it names")
# ClusterNetworkPolicy: the API's convention (network-policy-api), Accepted.
ACCEPTED = Condition("Accepted", "Accepted", "cilia enforces the policy",
                     "cilia cannot enforce the policy: the pods it selects are held closed",
                     consequence_in_status=True, warnings=True)


class PolicyController:
    name = "policies"

    def __init__(self, client: KubeClient, metrics, events: EventPoster):
        self.client = client
        self.metrics = metrics
        self.events = events
        self.parse_cilia = parse_cilia_policy
        self.parse_cluster_network_policy = parse_cluster_network_policy
        self._lock = threading.Lock()
        # uid -> the error last reported (None: reported valid), per kind
        self.reported: dict[str, dict[str, str | None]] = {
            "NetworkPolicy": {}, "CiliaNetworkPolicy": {}, "CiliaClusterwideNetworkPolicy": {},
            "ClusterNetworkPolicy": {}}

    def _count(self) -> None:
        for kind, seen in self.reported.items():
            self.metrics.invalid_policies.labels(kind).set(
                sum(1 for e in seen.values() if e is not None))

    def forget(self, kind: str, uid: str) -> None:
        with self._lock:
            self.reported[kind].pop(uid, None)
            self._count()

    # ---- NetworkPolicy -----------------------------------------------------------------

    def check_network_policy(self, obj: dict) -> PolicyError | None:
        error = validity(parse_network_policy, obj)
        uid = obj["metadata"].get("uid") or obj["metadata"]["name"]
        with self._lock:
            before = self.reported["NetworkPolicy"].get(uid, "unseen")
            self.reported["NetworkPolicy"][uid] = str(error) if error else None
            self._count()
        if error is not None and before != str(error):
            self.events.post(obj, WARNING, "InvalidNetworkPolicy",
                             f"{error} (cilia cannot enforce this policy: the pods it selects "
                             "stay isolated in the directions it names)")
        elif error is None and before not in (None, "unseen"):
            self.events.post(obj, NORMAL, "ValidNetworkPolicy", "the policy is enforced")
        return error

    # ---- CiliaNetworkPolicy, CiliaClusterwideNetworkPolicy, ClusterNetworkPolicy -------

    def check_cilia_policy(self, obj: dict, resource) -> PolicyError | None:
        return self.check_policy_status(obj, resource, self.parse_cilia, VALID)

    def check_cluster_network_policy(self, obj: dict) -> PolicyError | None:
        return self.check_policy_status(obj, CLUSTER_NETWORK_POLICIES,
                                        self.parse_cluster_network_policy, ACCEPTED)

    def check_policy_status(self, obj: dict, resource, parse: Callable[[dict], object],
                            condition: Condition) -> PolicyError | None:
        """Checks a policy with the agents' parser and writes what it says into the
        policy's `condition`, only when that changed."""
        error, warnings = checked(parse, obj)
        kind, meta = resource.kind, obj["metadata"]
        conditions = list((obj.get("status") or {}).get("conditions") or [])
        current = next((c for c in conditions if c.get("type") == condition.type), None)
        wanted = condition.wanted(error, warnings, int(meta.get("generation") or 0))
        same = current is not None and all(current.get(k) == v for k, v in wanted.items())
        with self._lock:
            self.reported[kind][meta.get("uid") or meta["name"]] = str(error) if error else None
            self._count()
        if same:
            return error
        keep = current is not None and current.get("status") == wanted["status"]
        wanted["lastTransitionTime"] = (current.get("lastTransitionTime") if keep else None
                                        ) or now()
        others = [c for c in conditions if c.get("type") != condition.type]
        self.client.patch(resource, meta.get("namespace"), meta["name"],
                          {"status": {"conditions": [*others, wanted]}}, "status")
        if error is not None and (current is None
                                  or current.get("message") != wanted["message"]):
            self.events.post(obj, WARNING, f"Invalid{kind}",
                             f"{error} ({condition.consequence})")
        log.info("%s %s%s: %s=%s%s", kind,
                 f"{meta['namespace']}/" if meta.get("namespace") else "", meta["name"],
                 condition.type, wanted["status"], f" ({error})" if error else "")
        return error

    # ---- kopf --------------------------------------------------------------------------

    def register(self, registry: kopf.OperatorRegistry) -> None:
        @kopf.on.event("networking.k8s.io", "v1", "networkpolicies", id="check_network_policy",
                       registry=registry)
        def network_policy_event(type: str | None, body: kopf.Body, uid: str, **_) -> None:
            if type == "DELETED":
                self.forget("NetworkPolicy", uid)
            else:
                self.check_network_policy(plain(body))

        @kopf.on.event("cilia.io", "v1alpha1", "cilianetworkpolicies", id="check_cilia_policy",
                       registry=registry)
        def cilia_policy_event(type: str | None, body: kopf.Body, uid: str, **_) -> None:
            if type == "DELETED":
                self.forget("CiliaNetworkPolicy", uid)
            else:
                self.check_cilia_policy(plain(body), CILIA_POLICIES)

        @kopf.on.event("cilia.io", "v1alpha1", "ciliaclusterwidenetworkpolicies",
                       id="check_cilia_clusterwide_policy", registry=registry)
        def cilia_cluster_policy_event(type: str | None, body: kopf.Body, uid: str,
                                       **_) -> None:
            if type == "DELETED":
                self.forget("CiliaClusterwideNetworkPolicy", uid)
            else:
                self.check_cilia_policy(plain(body), CILIA_CLUSTER_POLICIES)

        # Without the network-policy-api CRD, kopf says once that it cannot serve this
        # ("Unresolved resources") and the other handlers run all the same; a CRD
        # installed later is watched from the operator's next start (scanning is off).
        @kopf.on.event(CLUSTER_NETWORK_POLICIES.group, CLUSTER_NETWORK_POLICIES.version,
                       CLUSTER_NETWORK_POLICIES.plural, id="check_cluster_network_policy",
                       registry=registry)
        def cluster_network_policy_event(type: str | None, body: kopf.Body, uid: str,
                                         **_) -> None:
            if type == "DELETED":
                self.forget("ClusterNetworkPolicy", uid)
            else:
                self.check_cluster_network_policy(plain(body))

    def sweep(self) -> None:
        pass  # event-driven: every change of a policy is a watch event
