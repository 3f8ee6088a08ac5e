"""Access control: who may read, write and watch which subtree.

A rule grants a set of permissions (``read``, ``write``, ``watch``) on a
subtree to a principal: a bare JID or a group (``group:NAME``). For a given
requester and key, the most specific rule wins: the rule on the longest
segment-wise prefix of the key among those naming the requester or one of
its groups (at equal depth a rule naming the JID beats rules naming its
groups, and group rules add up). With no rule at all, a known requester may
read and watch but not write: writes are denied by default.

Rules and group memberships live in the store itself, so they change without
a restart::

    /sys/acl/rules/<principal><subtree>    JSON {"allow": ["read", "watch"]}
    /sys/acl/groups/<group>/<bare jid>     (empty)

(a rule on ``/`` is the key ``/sys/acl/rules/<principal>`` itself). Only
admins may change ``/sys/acl``. The node's own config bootstraps the policy:
the admins, groups given by JID patterns, and the subtrees where any JID may
write the keys named after itself (``self_write``, for the agent registry).
Storage nodes of the cluster are peers and may do anything. A JID the policy
does not know at all is refused everything.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol import keys
from protocol.model import KeyValue

log = logging.getLogger(__name__)

READ, WRITE, WATCH = "read", "write", "watch"
PERMISSIONS = frozenset({READ, WRITE, WATCH})
ACL_ROOT = "/sys/acl"
RULES = "/sys/acl/rules"
GROUPS = "/sys/acl/groups"
GROUP_PREFIX = "group:"


def bare(jid: str) -> str:
    slash = jid.find("/")
    return (jid if slash < 0 else jid[:slash]).lower()


@dataclass(frozen=True)
class Rule:
    subtree: str
    principal: str
    """A bare JID, or ``group:NAME``."""
    allow: frozenset[str]

    def key(self) -> str:
        return rule_key(self.subtree, self.principal)


def rule_key(subtree: str, principal: str) -> str:
    return keys.join(RULES, keys.escape_segment(principal), *keys.segments(subtree))


def group_key(group: str, jid: str) -> str:
    return keys.join(GROUPS, keys.escape_segment(group), keys.escape_segment(bare(jid)))


def parse_permissions(text: Iterable[str]) -> frozenset[str]:
    allowed = frozenset(p.strip().lower() for p in text if p.strip())
    unknown = allowed - PERMISSIONS
    if unknown:
        raise ValueError(f"unknown permissions {sorted(unknown)}; use read, write, watch")
    return allowed


@dataclass
class AclSettings:
    """The bootstrap policy from a node's config (``[acl]``)."""

    enabled: bool = False
    admins: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Group -> bare JID patterns (``*@example.org``)."""
    self_write: list[str] = field(default_factory=lambda: ["/sys/agents", "/sys/resources"])
    rules: list[Rule] = field(default_factory=list)

    @classmethod
    def from_dict(cls, table: dict[str, Any] | None) -> AclSettings:
        if not table:
            return cls()
        rules = []
        for entry in table.get("rules", []):
            rules.append(Rule(keys.validate(entry["subtree"], allow_root=True),
                              entry["principal"], parse_permissions(entry.get("allow", []))))
        return cls(
            enabled=bool(table.get("enabled", True)),
            admins=[bare(a) for a in table.get("admins", [])],
            groups={name: list(patterns) for name, patterns in table.get("groups", {}).items()},
            self_write=list(table.get("self_write", ["/sys/agents", "/sys/resources"])),
            rules=rules,
        )


class Policy:
    """Decides requests; rebuilt from the store whenever ``/sys/acl`` changes."""

    def __init__(self, settings: AclSettings, peers: Iterable[str] = ()) -> None:
        self.settings = settings
        self.peers = {bare(p) for p in peers}
        self.rules: list[Rule] = list(settings.rules)
        self.members: dict[str, set[str]] = {}
        self._groups_cache: dict[str, frozenset[str]] = {}
        """Bare JID -> its groups; every request asks, and patterns cost a match each."""

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def update(self, entries: Iterable[KeyValue]) -> None:
        """Replace the store-held rules and groups with ``entries`` (all of /sys/acl)."""
        rules = list(self.settings.rules)
        members: dict[str, set[str]] = {}
        rule_depth = len(keys.segments(RULES))
        group_depth = len(keys.segments(GROUPS))
        for entry in entries:
            parts = keys.segments(entry.key)
            try:
                if keys.is_strict_prefix(RULES, entry.key):
                    principal = keys.unescape_segment(parts[rule_depth])
                    subtree = keys.join(keys.ROOT, *parts[rule_depth + 1:])
                    allow = parse_permissions(json.loads(entry.value or b"{}").get("allow", []))
                    rules.append(Rule(subtree, principal, allow))
                elif keys.is_strict_prefix(GROUPS, entry.key) and len(parts) == group_depth + 2:
                    group = keys.unescape_segment(parts[group_depth])
                    members.setdefault(group, set()).add(
                        bare(keys.unescape_segment(parts[group_depth + 1])))
            except (ValueError, AttributeError, TypeError) as error:
                log.warning("ignoring a malformed ACL entry %s: %s", entry.key, error)
        self.rules, self.members = rules, members
        self._groups_cache = {}

    # --- who is who -------------------------------------------------------

    def _groups(self, who: str) -> frozenset[str]:
        cached = self._groups_cache.get(who)
        if cached is not None:
            return cached
        found = {g for g, members in self.members.items() if who in members}
        found.update(g for g, patterns in self.settings.groups.items()
                     if any(fnmatch.fnmatchcase(who, p.lower()) for p in patterns))
        if len(self._groups_cache) > 10_000:
            self._groups_cache.clear()
        self._groups_cache[who] = frozenset(found)
        return self._groups_cache[who]

    def _admin(self, who: str) -> bool:
        return who in self.settings.admins or "admins" in self._groups(who)

    def _trusted(self, who: str) -> bool:
        """A peer node or an admin (``who``: a bare JID): allowed everything."""
        return who in self.peers or self._admin(who)

    def known(self, jid: str) -> bool:
        if not self.enabled:
            return True
        return self._known(bare(jid))

    def _known(self, who: str) -> bool:
        return (self._trusted(who) or bool(self._groups(who))
                or any(rule.principal == who for rule in self.rules))

    # --- decisions --------------------------------------------------------

    def _principals(self, who: str) -> set[str]:
        return {GROUP_PREFIX + g for g in self._groups(who)}

    def _rule_decision(self, who: str, groups: set[str], perm: str, key: str) -> bool:
        best_depth = -1
        personal: set[str] | None = None
        shared: set[str] = set()
        for rule in self.rules:
            if not keys.is_prefix(rule.subtree, key):
                continue
            if rule.principal != who and rule.principal not in groups:
                continue
            depth = keys.depth(rule.subtree)
            if depth > best_depth:
                best_depth, personal, shared = depth, None, set()
            if depth == best_depth:
                if rule.principal == who:
                    personal = set(rule.allow) | (personal or set())
                else:
                    shared |= rule.allow
        if best_depth < 0:
            return perm in (READ, WATCH)
        return perm in (personal if personal is not None else shared)

    def _self_write(self, who: str, key: str) -> bool:
        if not any(keys.is_strict_prefix(root, key) for root in self.settings.self_write):
            return False
        owner = keys.unescape_segment(keys.segments(key)[-1])
        return bare(owner) == who

    def allows(self, jid: str, perm: str, key: str) -> bool:
        if not self.enabled:
            return True
        who = bare(jid)
        return self._trusted(who) or self._untrusted_allows(who, perm, key)

    def _untrusted_allows(self, who: str, perm: str, key: str) -> bool:
        """:meth:`allows` for a bare JID already known not to be trusted."""
        if not self._known(who):
            return False
        if keys.is_prefix(ACL_ROOT, key):
            return perm != WRITE
        if perm == WRITE and self._self_write(who, key):
            return True
        return self._rule_decision(who, self._principals(who), perm, key)

    def allows_subtree(self, jid: str, perm: str, key: str) -> bool:
        """``perm`` on ``key`` and on everything below it (for a prefix delete)."""
        if not self.enabled:
            return True
        who = bare(jid)
        if self._trusted(who):
            return True
        if not self._untrusted_allows(who, perm, key):
            return False
        if keys.is_prefix(key, ACL_ROOT) and perm == WRITE:
            return False
        groups = self._principals(who)
        return all(self._rule_decision(who, groups, perm, rule.subtree)
                   for rule in self.rules if keys.is_strict_prefix(key, rule.subtree))

    def reader(self, jid: str) -> Callable[[str], bool]:
        """A predicate: may ``jid`` read this key? (for filtering answers and events)"""
        if not self.enabled or self._trusted(bare(jid)):
            return _everything
        return lambda key: self.allows(jid, READ, key)


def _everything(_: str) -> bool:
    return True
