"""The health of each endpoint of a fleet: up, busy for a while, down (probed again with backoff), or refusing us.

Pure bookkeeping, no I/O: the fleet client (endpoints.py) reports what each request and probe came to, and
asks which endpoints may take a request now and which are due a probe. One thread (the client's dispatcher)
owns it. A server that keeps failing requests is dropped for a while, not for good: it is probed again,
less often each time it is dropped, and rejoins once it answers; only a server that refuses us (the key,
the model, the URL) stays out, since waiting does not fix that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from .wire import Server

log = logging.getLogger("caprl_local")

State = Literal["new", "up", "busy", "down", "refused"]
#: Requests at once to a server that does not say how many captions it decodes together.
DEFAULT_WIDTH = 4


@dataclass(frozen=True)
class Policy:
    """How the fleet judges its endpoints (each a bound, so that no server's answer can stall a run)."""

    drop_after: int = 3  # failed requests in a row that drop an endpoint for a while
    probe_min_s: float = 1.0  # the first wait before probing a dropped endpoint again; doubled each time, up to
    probe_max_s: float = 30.0
    busy_min_s: float = 0.5  # a Retry-After is honoured within these bounds (none given: doubled from the least)
    busy_max_s: float = 30.0


@dataclass(eq=False)
class Member:
    """One endpoint as the fleet sees it."""

    url: str
    given_model: str | None
    given_width: int | None
    server: Server | None = None  # what its last probe learnt (None until one answered)
    state: State = "new"
    why: str = ""  # why it is not up, for messages
    in_flight: int = 0
    faults: int = 0  # requests failed in a row
    until: float = 0.0  # busy: until then; new or down: its next probe then
    probing: bool = False
    backoff_s: float = 0.0
    busy_s: float = 0.0
    busy_since: float | None = None  # when it began answering only "busy" (None: it answers)
    dropped: int = field(default=0)  # times it went down

    def stalled(self, now: float, longest_s: float) -> bool:
        """Whether it has answered nothing but "busy" for longer than `longest_s`."""
        return self.busy_since is not None and now - self.busy_since > longest_s

    @property
    def width(self) -> int:
        return self.given_width or (self.server.slots if self.server and self.server.slots else None) or DEFAULT_WIDTH


class Fleet:
    """The members of a fleet and their health; see the module docstring."""

    def __init__(self, members: list[Member], policy: Policy) -> None:
        self.members, self.policy = members, policy
        for member in members:
            member.backoff_s, member.busy_s = policy.probe_min_s, policy.busy_min_s

    # -- questions --

    def free(self, now: float) -> list[Member]:
        """The members that may take one more request now."""
        for member in self.members:
            if member.state == "busy" and member.until <= now:
                member.state = "up"
        return [m for m in self.members if m.state == "up" and m.in_flight < m.width]

    def due(self, now: float) -> list[Member]:
        """The members to probe now: not yet known, or down and their wait over."""
        return [m for m in self.members if m.state in ("new", "down") and not m.probing and m.until <= now]

    def refused_all(self) -> bool:
        return all(m.state == "refused" for m in self.members)

    def next_change(self, now: float) -> float:
        """Seconds until a busy member may take requests again or a down one is due its probe."""
        waits = [m.until - now for m in self.members if m.state in ("busy", "down", "new") and not m.probing]
        return max(0.0, min(waits, default=1.0))

    def describe(self) -> str:
        """Each member that is not up and why, for a message."""
        return "; ".join(f"{m.url}: {m.state} ({m.why})" if m.why else f"{m.url}: {m.state}"
                         for m in self.members if m.state != "up") or "every endpoint is up"

    # -- what happened --

    def joined(self, member: Member, server: Server) -> None:
        """A probe answered: the member takes requests."""
        if member.state == "down":
            log.warning("%s is back (%s); it takes images again", member.url, server.model)
        member.server, member.state, member.why, member.faults, member.busy_since = server, "up", "", 0, None

    def answered(self, member: Member) -> None:
        """A request got an answer of substance (a caption, or this image's own failure)."""
        member.faults, member.busy_since = 0, None
        member.backoff_s, member.busy_s = self.policy.probe_min_s, self.policy.busy_min_s

    def faulted(self, member: Member, why: str, now: float) -> None:
        """A request failed on the server's side (5xx, garbage, a hang)."""
        member.faults += 1
        if member.faults == 1:  # the first of a run of failures is worth a line; a run of them, its drop
            log.warning("%s %s; the image goes to another endpoint", member.url, why)
        if member.faults >= self.policy.drop_after and member.state in ("up", "busy"):
            self.down(member, f"{why}, {member.faults} requests in a row", now)

    def busy(self, member: Member, retry_after_s: float | None, why: str, now: float) -> None:
        """The server said it is busy: no new request until it may be ready (its Retry-After, within bounds)."""
        wait = member.busy_s if retry_after_s is None else retry_after_s
        wait = min(self.policy.busy_max_s, max(self.policy.busy_min_s, wait))
        member.busy_s = min(self.policy.busy_max_s, member.busy_s * 2)
        if member.busy_since is None:
            member.busy_since = now
        if member.state in ("up", "busy"):
            if member.state == "up":
                log.info("%s %s; asking it again in %.1f s", member.url, why, wait)
            member.state, member.why, member.until = "busy", why, max(member.until, now + wait)

    def not_ready(self, member: Member, retry_after_s: float | None, why: str, now: float) -> None:
        """A probe was answered busy (a server still loading its model): probed again soon, not dropped."""
        if member.state != "down":
            log.warning("%s %s; it is asked again until it is ready", member.url, why)
        wait = min(self.policy.probe_max_s, max(self.policy.busy_min_s, retry_after_s or member.busy_s))
        member.busy_s = min(self.policy.busy_max_s, member.busy_s * 2)
        member.state, member.why, member.until = "down", why, now + wait

    def down(self, member: Member, why: str, now: float) -> None:
        """The member cannot take requests: probed again after a wait that doubles each time."""
        if member.state == "refused":
            return
        if member.state != "down":
            log.warning("%s is down (%s); its images go to the other endpoints, and it is probed again "
                        "in %.0f s", member.url, why, member.backoff_s)
        member.state, member.why, member.until = "down", why, now + member.backoff_s
        member.backoff_s = min(self.policy.probe_max_s, member.backoff_s * 2)
        member.dropped += 1

    def refused(self, member: Member, why: str) -> None:
        """The member refuses us: it stays out (the key, the model or the URL is wrong)."""
        if member.state != "refused":
            log.error("%s %s; it is left out", member.url, why)
        member.state, member.why = "refused", why
