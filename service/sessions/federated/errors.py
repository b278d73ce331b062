"""Errors about federated rounds and versions. ``service/api/errors.py`` maps each to a status."""

from __future__ import annotations

from service.sessions.errors import SessionError


class NotFederated(SessionError):
    """A federated endpoint on a session created without ``aggregation`` (409)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} was created without 'aggregation'; it takes steps, "
            "not client updates"
        )
        self.session_id = session_id


class StepsNotAccepted(SessionError):
    """``POST .../step`` on a federated session: its params move only by aggregation (409)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} aggregates client updates: POST them to "
            f"/v1/sessions/{session_id}/updates instead of stepping it directly"
        )
        self.session_id = session_id


class RoundClosed(SessionError):
    """An update for a round that has already closed (410: it can never be accepted)."""

    def __init__(self, round_number: int, current: int) -> None:
        super().__init__(
            f"round {round_number} is closed; the session is at round {current}: fetch its "
            "params and train again"
        )
        self.round = round_number
        self.current = current


class RoundNotOpen(SessionError):
    """An update for a round that has not opened yet (409)."""

    def __init__(self, round_number: int, current: int) -> None:
        super().__init__(f"round {round_number} has not opened; the session is at round {current}")
        self.round = round_number
        self.current = current


class UpdateConflict(SessionError):
    """The client already gave a different update for this round or base version (409)."""

    def __init__(self, client_id: str, where: str) -> None:
        super().__init__(
            f"client {client_id!r} already submitted a different update for {where}; "
            "one update per client per round"
        )
        self.client_id = client_id
        self.where = where


class UpdateTooStale(SessionError):
    """An asynchronous update trained from too old a version (410)."""

    def __init__(self, base_version: int, version: int, max_staleness: int) -> None:
        super().__init__(
            f"the update was trained from version {base_version}, {version - base_version} "
            f"versions behind the session's {version}; at most {max_staleness} are accepted: "
            "fetch the params and train again"
        )
        self.base_version = base_version
        self.version = version
        self.max_staleness = max_staleness
