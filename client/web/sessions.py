"""Each visitor's state on the page's server: their photo, the clicks' segment session, the last result.

Sessions are bounded (``WEB_MAX_SESSIONS`` and ``WEB_MAX_SESSION_BYTES`` of photos and results, least recently
used out first): a visitor whose session was dropped is told to upload the photo again, never shown another's.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from isekai import constants as C
from isekai.client.client import IsekaiClient, SegmentSession, SwapStream


@dataclass
class Photo:
    data: bytes  # as uploaded: what Triton decodes (EXIF-rotated there and here alike)
    display: bytes  # PNG of the decoded RGB the clicks refer to
    width: int
    height: int
    name: str


@dataclass
class Session:
    id: str
    photo: Photo | None = None
    segment: SegmentSession | None = None
    result: bytes | None = None
    stream: SwapStream | None = None  # the Generate running now, if any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def size(self) -> int:
        photo = 0 if self.photo is None else len(self.photo.data) + len(self.photo.display)
        return photo + len(self.result or b"")

    def set_photo(self, client: IsekaiClient, photo: Photo) -> None:
        self.cancel()
        self.photo, self.result = photo, None
        self.segment = client.segment_session(photo.data)

    def clear_clicks(self, client: IsekaiClient) -> None:
        if self.photo is not None:
            self.segment = client.segment_session(self.photo.data)

    def cancel(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()


class SessionStore:
    """Sessions by id, least recently used first out."""

    def __init__(self, max_sessions: int = C.WEB_MAX_SESSIONS,
                 max_bytes: int = C.WEB_MAX_SESSION_BYTES) -> None:
        self.max_sessions, self.max_bytes = max_sessions, max_bytes
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def create(self) -> Session:
        session = Session(secrets.token_urlsafe(16))
        with self._lock:
            self._sessions[session.id] = session
            self._trim()
        return session

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
            return session

    def touch(self) -> None:
        """Re-apply the bounds after a session grew (a photo or a result stored)."""
        with self._lock:
            self._trim()

    def _trim(self) -> None:
        while len(self._sessions) > self.max_sessions or (
            len(self._sessions) > 1 and sum(s.size() for s in self._sessions.values()) > self.max_bytes
        ):
            _, dropped = self._sessions.popitem(last=False)
            dropped.cancel()

    def __len__(self) -> int:
        return len(self._sessions)
