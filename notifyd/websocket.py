"""RFC 6455 for the server side, with no I/O: the handshake, client frames in, frames out.

:func:`handshake` checks an upgrade request's headers and builds the ``101``
response. :class:`FrameParser` turns the bytes a client sends into whole messages
(reassembling fragments, unmasking, checking UTF-8 and the protocol's rules) and
raises :class:`WebSocketError` with the close code the connection must end with.
The frame builders make unmasked server frames; a notification's frame is built
once and written as-is to every socket that gets it.

Compression (permessage-deflate) is never negotiated: one frame is shared by
every socket, and per-socket deflate state would cost more memory than a socket
is allowed.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import struct
from collections.abc import Mapping
from typing import Final

from .errors import HandshakeError, WebSocketError

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

#: Close codes of RFC 6455 itself (notifyd's own are in :class:`notifyd.protocol.CloseCode`).
NORMAL_CLOSURE: Final = 1000
PROTOCOL_ERROR: Final = 1002
INVALID_DATA: Final = 1007
MESSAGE_TOO_BIG: Final = 1009

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def handshake(headers: Mapping[str, str], subprotocols: tuple[str, ...] = ()) -> bytes:
    """The ``101 Switching Protocols`` response for a valid upgrade request.

    ``headers`` is the request's (case-insensitive) header mapping. The first of
    the client's offered subprotocols that is in ``subprotocols`` is echoed.
    Raises :class:`HandshakeError` for a request that is not a WebSocket upgrade.
    """
    if "websocket" not in _tokens(headers.get("Upgrade", "")):
        raise HandshakeError(400, "expected a WebSocket upgrade (Upgrade: websocket)")
    if "upgrade" not in _tokens(headers.get("Connection", "")):
        raise HandshakeError(400, "expected Connection: upgrade")
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise HandshakeError(
            426, "only WebSocket version 13 is supported", {"Sec-WebSocket-Version": "13"}
        )
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_key(key).encode(),
    ]
    offered = headers.get("Sec-WebSocket-Protocol")
    if offered and subprotocols:
        for name in (t.strip() for t in offered.split(",")):
            if name in subprotocols:
                lines.append(b"Sec-WebSocket-Protocol: " + name.encode())
                break
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- server -> client --------------------------------------------------------------


def _header(first: int, length: int) -> bytes:
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server->client text frame (RFC 6455 §5.2)."""
    return _header(0x80 | OP_TEXT, len(payload)) + payload


def binary_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server->client binary frame."""
    return _header(0x80 | OP_BINARY, len(payload)) + payload


def pong_frame(payload: bytes) -> bytes:
    """The answer to a client's ping, with the ping's payload (at most 125 bytes)."""
    return _header(0x80 | OP_PONG, len(payload)) + payload


#: A server->client ping with no payload (the heartbeat).
PING_FRAME: Final = b"\x89\x00"
#: A close frame's reason fits in a control frame's 125 bytes after the 2-byte code.
MAX_CLOSE_REASON: Final = 123


def close_reason(reason: str) -> bytes:
    """A close reason cut to fit a control frame, never inside a UTF-8 sequence."""
    return reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore").encode()


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A server->client close frame (RFC 6455 §5.5.1); ``None``: no status code."""
    if code is None:
        return b"\x88\x00"
    payload = code.to_bytes(2, "big") + close_reason(reason)
    return struct.pack("!BB", 0x88, len(payload)) + payload


# --- client -> server --------------------------------------------------------------


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 §7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a client's close frame; raises WebSocketError if invalid."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise WebSocketError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not valid_close_code(code):
        raise WebSocketError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError(INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3).

    Done on whole integers: one C-level pass instead of a Python loop per byte.
    """
    length = len(payload)
    if not length:
        return b""
    key = int.from_bytes((mask * ((length + 3) // 4))[:length], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(length, "little")


#: What :meth:`FrameParser.next` returns: (opcode, payload) of one whole message or
#: control frame. TEXT payloads have been checked to be UTF-8.
Message = tuple[int, bytes]


class FrameParser:
    """Client frames in, whole messages out (RFC 6455 §5), one connection's state.

    Feed bytes with :meth:`feed`, then call :meth:`next` until it returns None.
    Frames are read from the buffer in place (an offset, no slicing per frame);
    bytes of an incomplete frame wait as a list of chunks, joined once the frame
    is whole, so a large message costs one copy, not one per read. A text message
    split into fragments is checked for UTF-8 fragment by fragment, so a bad one
    fails before the rest arrives.
    """

    __slots__ = (
        "_buffer",
        "_chunks",
        "_decoder",
        "_extra",
        "_need",
        "_opcode",
        "_parts",
        "_parts_size",
        "_pos",
        "max_size",
    )

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        #: Bytes being parsed and how far; later reads wait in _chunks (_extra bytes).
        self._buffer = b""
        self._pos = 0
        self._chunks: list[bytes] | None = None
        self._extra = 0
        #: Bytes needed before the next frame can be parsed (its header, then all of it).
        self._need = 2
        #: A fragmented message being reassembled: its opcode and payloads.
        self._opcode = 0
        self._parts: list[bytes] | None = None
        self._parts_size = 0
        self._decoder: codecs.IncrementalDecoder | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as messages."""
        return len(self._buffer) - self._pos + self._extra + self._parts_size

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._pos >= len(self._buffer):
            self._buffer = data
            self._pos = 0
        elif self._chunks is None:
            self._chunks = [data]
            self._extra = len(data)
        else:
            self._chunks.append(data)
            self._extra += len(data)

    def next(self) -> Message | None:
        """The next whole message or control frame, or None until more bytes come."""
        while len(self._buffer) - self._pos + self._extra >= self._need:
            if self._chunks is not None:
                self._buffer = b"".join([self._buffer[self._pos :], *self._chunks])
                self._pos = 0
                self._chunks = None
                self._extra = 0
            frame = self._frame(self._buffer, self._pos)
            if frame is None:
                continue  # _need grew: the header, or the payload, is not all here yet
            message, end = frame
            if end >= len(self._buffer):
                self._buffer = b""
                end = 0
            self._pos = end
            self._need = 2
            if message is not None:
                return message
        return None

    def _frame(self, buffer: bytes, start: int) -> tuple[Message | None, int] | None:
        """Parse the frame at ``start``; None (with ``_need`` set) if it is not all there."""
        size = len(buffer) - start
        first, second = buffer[start], buffer[start + 1]
        if first & 0x70:
            raise WebSocketError(PROTOCOL_ERROR, "reserved bits set (no extension negotiated)")
        if not second & 0x80:
            raise WebSocketError(PROTOCOL_ERROR, "client frames must be masked")
        fin = first & 0x80
        opcode = first & 0x0F
        length = second & 0x7F
        offset = 2
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise WebSocketError(PROTOCOL_ERROR, f"reserved opcode {opcode}")
            if not fin or length > 125:
                raise WebSocketError(PROTOCOL_ERROR, "control frames must be whole and short")
        elif opcode > OP_BINARY:
            raise WebSocketError(PROTOCOL_ERROR, f"reserved opcode {opcode}")
        elif (opcode == OP_CONTINUATION) is (self._parts is None):
            # Decided at the header, before a payload that will be refused is buffered.
            raise WebSocketError(
                PROTOCOL_ERROR,
                "continuation frame without a message"
                if opcode == OP_CONTINUATION
                else "new message before the last one ended",
            )
        if length == 126:
            if size < 4:
                self._need = 4 + 4
                return None
            length = int.from_bytes(buffer[start + 2 : start + 4], "big")
            offset = 4
        elif length == 127:
            if size < 10:
                self._need = 10 + 4
                return None
            length = int.from_bytes(buffer[start + 2 : start + 10], "big")
            if length >> 63:
                raise WebSocketError(PROTOCOL_ERROR, "frame length has its top bit set")
            offset = 10
        if opcode < OP_CLOSE and self._parts_size + length > self.max_size:
            raise WebSocketError(MESSAGE_TOO_BIG, f"message larger than {self.max_size} bytes")
        mask_at = start + offset
        end = mask_at + 4 + length
        if len(buffer) < end:
            self._need = end - start
            return None
        payload = unmask(buffer[mask_at + 4 : end], buffer[mask_at : mask_at + 4])
        return self._message(fin, opcode, payload), end

    def _message(self, fin: int, opcode: int, payload: bytes) -> Message | None:
        if opcode >= OP_CLOSE:
            return opcode, payload
        # A continuation continues a message, and a new message starts with none
        # in progress: :meth:`_frame` checked that at the header.
        parts = self._parts
        if parts is None:
            if fin:
                if opcode == OP_TEXT:
                    _check_utf8(payload)
                return opcode, payload
            parts = self._parts = []
            self._opcode = opcode
            self._parts_size = 0
            if opcode == OP_TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        if self._decoder is not None:
            try:
                self._decoder.decode(payload, final=bool(fin))
            except UnicodeDecodeError:
                raise WebSocketError(INVALID_DATA, "text message is not UTF-8") from None
        parts.append(payload)
        self._parts_size += len(payload)
        if not fin:
            return None
        message = (self._opcode, b"".join(parts))
        self._parts = None
        self._parts_size = 0
        self._decoder = None
        return message


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise WebSocketError(INVALID_DATA, "text message is not UTF-8") from None
