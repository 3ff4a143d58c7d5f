"""Planning step: the group's shared children (headless Service, token Secret, report Role and RoleBinding,
NetworkPolicy).

Pure. A missing child is created, a drifted one repaired, and one of our name that this WeightSync does not
control (no controller reference to its uid) is never adopted, changed or deleted: it is reported as a
conflict, and no member is created while it stands (a foreign Secret would hand members a token we did not
make; a foreign Service would leave their DNS names to someone else).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import constants as c
from . import desired, names
from .decision import Action, Create, Event, Patch
from .observed import Obj, Observed, describe_controller, is_owned


@dataclass(frozen=True)
class Shared:
    actions: list[Action] = field(default_factory=list)
    #: Children of our names that we do not control, described for a condition.
    conflicts: list[str] = field(default_factory=list)
    #: The uid of the token Secret members get their token from; None until it exists and is ours.
    secret_uid: str | None = None


def _drift(observed: Obj, wanted: Obj, keys: tuple[str, ...]) -> Obj:
    """The top-level `keys` of `wanted` whose values the observed object does not hold (a merge patch)."""
    patch: Obj = {}
    for key in keys:
        want, have = wanted.get(key), observed.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            sub = {k: v for k, v in want.items() if have.get(k) != v}
            if sub:
                patch[key] = sub
        elif want != have:
            patch[key] = want
    return patch


def _conflict(kind: str, name: str, obj: Obj) -> str:
    controller = describe_controller(obj)
    by = f"it is controlled by {controller}" if controller else "it has no controller"
    return f"{kind} {name} exists and is not this WeightSync's ({by}); delete or rename it"


def shared_children(group: desired.Group, observed: Observed, token: str, members_exist: bool) -> Shared:
    """Create what is missing, repair what drifted, report what is someone else's.

    `token`: a fresh random token, used only if the Secret has to be created. `members_exist`: owned member
    pods exist, so a Secret created now replaces the one they hold (they are replaced: see membership)."""
    actions: list[Action] = []
    conflicts: list[str] = []
    name = group.name

    svc = desired.service(group)
    svc_name = names.service_name(name)
    if observed.service is None:
        actions.append(Create(svc, Event("Normal", c.REASON_CREATED, f"created headless Service {svc_name}")))
    elif not is_owned(observed.service, group.uid):
        conflicts.append(_conflict("Service", svc_name, observed.service))
    else:
        patch = _drift(observed.service.get("spec", {}), svc["spec"], ("selector", "publishNotReadyAddresses", "ports"))
        if patch:
            event = Event("Normal", c.REASON_UPDATED, f"repaired Service {svc_name}: {sorted(patch)}")
            actions.append(Patch("Service", svc_name, {"spec": patch}, event))

    secret_uid: str | None = None
    secret_name = names.secret_name(name)
    if observed.secret is None:
        event = (
            Event(
                "Warning",
                c.REASON_TOKEN_RECREATED,
                f"Secret {secret_name} was missing and got a new token; the members holding the old one are "
                "replaced",
            )
            if members_exist
            else Event("Normal", c.REASON_CREATED, f"created Secret {secret_name} with the group token")
        )
        actions.append(Create(desired.secret(group, token), event))
    elif not is_owned(observed.secret, group.uid):
        conflicts.append(_conflict("Secret", secret_name, observed.secret))
    else:
        secret_uid = str(observed.secret.get("metadata", {}).get("uid") or "") or None

    for kind, observed_obj, wanted, keys in (
        ("Role", observed.role, desired.report_role(group), ("rules",)),
        ("RoleBinding", observed.role_binding, desired.report_role_binding(group), ("subjects",)),
    ):
        role_name = wanted["metadata"]["name"]
        if observed_obj is None:
            actions.append(Create(wanted, Event("Normal", c.REASON_CREATED, f"created {kind} {role_name}")))
        elif not is_owned(observed_obj, group.uid):
            conflicts.append(_conflict(kind, role_name, observed_obj))
        elif kind == "RoleBinding" and observed_obj.get("roleRef") != wanted["roleRef"]:
            # roleRef is immutable: a binding to another role cannot be repaired, only reported
            conflicts.append(f"RoleBinding {role_name} binds another role than {role_name}; delete it")
        else:
            patch = {k: wanted[k] for k in keys if observed_obj.get(k) != wanted[k]}
            if patch:
                event = Event("Normal", c.REASON_UPDATED, f"repaired {kind} {role_name}")
                actions.append(Patch(kind, role_name, patch, event))
    if group.spec.network.network_policy:
        policy = desired.network_policy(group)
        policy_name = policy["metadata"]["name"]
        if observed.network_policy is None:
            event = Event("Normal", c.REASON_CREATED, f"created NetworkPolicy {policy_name}")
            actions.append(Create(policy, event))
        elif not is_owned(observed.network_policy, group.uid):
            conflicts.append(_conflict("NetworkPolicy", policy_name, observed.network_policy))
        elif observed.network_policy.get("spec") != policy["spec"]:
            event = Event("Normal", c.REASON_UPDATED, f"repaired NetworkPolicy {policy_name}")
            actions.append(Patch("NetworkPolicy", policy_name, {"spec": policy["spec"]}, event))
    return Shared(actions, conflicts, secret_uid)
