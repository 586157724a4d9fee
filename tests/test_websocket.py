"""RFC 6455 without sockets: the handshake, client frames in, server frames out."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from multidict import CIMultiDict

from notifyd.errors import HandshakeError, WebSocketError
from notifyd.websocket import (
    INVALID_DATA,
    MAX_CLOSE_REASON,
    MESSAGE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PING_FRAME,
    PROTOCOL_ERROR,
    FrameParser,
    accept_key,
    binary_frame,
    close_frame,
    close_reason,
    handshake,
    parse_close,
    pong_frame,
    text_frame,
    unmask,
    valid_close_code,
)

MASK = b"\x37\xfa\x21\x3d"

# --- helpers ---------------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    mask: bytes = MASK,
    length: int | None = None,
) -> bytes:
    """A client frame; ``length`` overrides the length written in the header."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed_all(parser: FrameParser, data: bytes, step: int | None = None) -> list[tuple[int, bytes]]:
    """Feed ``data`` (in ``step``-byte pieces) and collect every message."""
    messages: list[tuple[int, bytes]] = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        parser.feed(piece)
        while (message := parser.next()) is not None:
            messages.append(message)
    return messages


def protocol_error(parser: FrameParser, data: bytes) -> WebSocketError:
    with pytest.raises(WebSocketError) as caught:
        feed_all(parser, data)
    return caught.value


def server_frames(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(first byte, payload length as sent, payload) of each unmasked server frame."""
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        assert not second & 0x80, "server frames are never masked"
        length, pos = second & 0x7F, pos + 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        yield first, length, data[pos : pos + length]
        pos += length


# --- the opening handshake -----------------------------------------------------------

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3


def upgrade(**overrides: str | None) -> CIMultiDict[str]:
    headers: dict[str, str | None] = {
        "Host": "example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": RFC_KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return CIMultiDict({k: v for k, v in headers.items() if v is not None})


def response_headers(response: bytes) -> dict[str, str]:
    assert response.endswith(b"\r\n\r\n")
    status, *lines = response[:-4].decode().split("\r\n")
    assert status == "HTTP/1.1 101 Switching Protocols"
    return dict(line.split(": ", 1) for line in lines)


def test_accept_key_of_the_rfc_example() -> None:
    assert accept_key(RFC_KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_answers_101_with_the_accept_key() -> None:
    headers = response_headers(handshake(upgrade()))
    assert headers == {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
    }


def test_handshake_accepts_any_key_of_16_bytes() -> None:
    key = base64.b64encode(bytes(range(16))).decode()
    expected = base64.b64encode(
        hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    assert response_headers(handshake(upgrade(Sec_WebSocket_Key=key)))["Sec-WebSocket-Accept"] == (
        expected
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"upgrade": "WebSocket"},
        {"Connection": "keep-alive, Upgrade"},
        {"connection": "upgrade"},
        {"Sec-WebSocket-Key": f"  {RFC_KEY} "},
    ],
)
def test_handshake_header_values_are_tokens_without_case(overrides: dict[str, str]) -> None:
    headers = upgrade()
    for name, value in overrides.items():
        headers[name] = value  # CIMultiDict: the same header, another spelling
    assert b"101 Switching Protocols" in handshake(headers)


@pytest.mark.parametrize("version", ["8", "12", "14", "", "13, 8"])
def test_other_websocket_versions_get_426_naming_13(version: str) -> None:
    with pytest.raises(HandshakeError) as caught:
        handshake(upgrade(Sec_WebSocket_Version=version))
    assert caught.value.status == 426
    assert caught.value.headers == {"Sec-WebSocket-Version": "13"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"Upgrade": None},
        {"Upgrade": "h2c"},
        {"Connection": None},
        {"Connection": "keep-alive"},
        {"Sec-WebSocket-Key": None},
        {"Sec-WebSocket-Key": ""},
        {"Sec-WebSocket-Key": "not base64!"},
        {"Sec-WebSocket-Key": base64.b64encode(b"fifteen bytes!!").decode()},
        {"Sec-WebSocket-Key": base64.b64encode(b"seventeen bytes!!").decode()},
        {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ"},  # padding missing
        {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==é"},
    ],
)
def test_bad_upgrades_get_400(overrides: dict[str, str | None]) -> None:
    headers = upgrade()
    for name, value in overrides.items():
        headers.popall(name, None)
        if value is not None:
            headers[name] = value
    with pytest.raises(HandshakeError) as caught:
        handshake(headers)
    assert caught.value.status == 400
    assert caught.value.message


@pytest.mark.parametrize(
    ("offered", "supported", "echoed"),
    [
        ("notifyd.v1", ("notifyd.v1",), "notifyd.v1"),
        ("chat, notifyd.v1", ("notifyd.v1",), "notifyd.v1"),
        ("notifyd.v1,chat", ("chat", "notifyd.v1"), "notifyd.v1"),  # the client's preference
        ("chat", ("notifyd.v1",), None),
        (None, ("notifyd.v1",), None),
        ("notifyd.v1", (), None),
        ("NOTIFYD.V1", ("notifyd.v1",), None),  # subprotocol names are case-sensitive
    ],
)
def test_subprotocol_is_echoed_only_when_offered_and_supported(
    offered: str | None, supported: tuple[str, ...], echoed: str | None
) -> None:
    headers = response_headers(handshake(upgrade(Sec_WebSocket_Protocol=offered), supported))
    assert headers.get("Sec-WebSocket-Protocol") == echoed


# --- server frames ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_text_frames_use_the_shortest_length(length: int, header: bytes) -> None:
    payload = b"x" * length
    assert text_frame(payload) == header + payload
    assert binary_frame(payload) == bytes([0x82]) + header[1:] + payload


def test_control_frames() -> None:
    assert pong_frame(b"abc") == b"\x8a\x03abc"
    assert PING_FRAME == b"\x89\x00"
    assert close_frame(None) == b"\x88\x00"
    assert close_frame(1000) == b"\x88\x02\x03\xe8"
    assert close_frame(4001, "bad token") == b"\x88\x0b\x0f\xa1bad token"


@pytest.mark.parametrize("reason", ["x" * 200, "é" * 100, "€" * 60, "a" + "😀" * 40])
def test_close_reasons_are_cut_to_fit_a_control_frame_on_a_character(reason: str) -> None:
    cut = close_reason(reason)
    assert len(cut) <= MAX_CLOSE_REASON
    assert reason.encode().startswith(cut)
    cut.decode()  # whole characters only
    assert len(cut) > MAX_CLOSE_REASON - 4
    (first, length, payload) = next(server_frames(close_frame(1000, reason)))
    assert first == 0x88 and length <= 125
    assert parse_close(payload) == (1000, cut.decode())


# --- unmasking ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 9, 125, 126, 1000, 65537])
def test_unmask_xors_with_the_mask_repeated(length: int) -> None:
    payload = bytes(i * 7 % 256 for i in range(length))
    expected = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    assert unmask(payload, MASK) == expected
    assert unmask(expected, MASK) == payload


# --- client frames: whole messages ---------------------------------------------------


def test_one_text_frame() -> None:
    assert feed_all(FrameParser(1024), frame(OP_TEXT, b"hello")) == [(OP_TEXT, b"hello")]


def test_frames_of_every_kind_in_one_read() -> None:
    data = (
        frame(OP_TEXT, "κόσμε".encode())
        + frame(OP_BINARY, b"\x00\xff")
        + frame(OP_PING, b"p")
        + frame(OP_PONG, b"")
        + frame(OP_TEXT, b"")
        + frame(OP_CLOSE, b"\x03\xe8")
    )
    assert feed_all(FrameParser(1024), data) == [
        (OP_TEXT, "κόσμε".encode()),
        (OP_BINARY, b"\x00\xff"),
        (OP_PING, b"p"),
        (OP_PONG, b""),
        (OP_TEXT, b""),
        (OP_CLOSE, b"\x03\xe8"),
    ]


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000, 65536])
def test_any_split_of_the_bytes_gives_the_same_messages(step: int) -> None:
    payloads = [bytes([i % 251]) * size for i, size in enumerate(SIZES)]
    data = b"".join(frame(OP_BINARY, p) for p in payloads) + frame(OP_TEXT, "ü€😀".encode())
    parser = FrameParser(1 << 20)
    messages = feed_all(parser, data, step)
    assert messages == [(OP_BINARY, p) for p in payloads] + [(OP_TEXT, "ü€😀".encode())]
    assert parser.buffered == 0


def test_nothing_until_a_frame_is_whole() -> None:
    parser = FrameParser(1024)
    data = frame(OP_TEXT, b"x" * 300)
    for i in range(len(data) - 1):
        parser.feed(data[i : i + 1])
        assert parser.next() is None
        assert parser.buffered == i + 1
    parser.feed(data[-1:])
    assert parser.next() == (OP_TEXT, b"x" * 300)
    assert parser.next() is None
    assert parser.buffered == 0


def test_64_bit_lengths() -> None:
    payload = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length
    data = frame(OP_BINARY, payload)
    assert data[1] == 0x80 | 127
    assert feed_all(FrameParser(1 << 20), data, 4096) == [(OP_BINARY, payload)]


def test_messages_up_to_the_limit_pass() -> None:
    parser = FrameParser(1000)
    data = frame(OP_TEXT, b"a" * 1000)
    data += frame(OP_TEXT, b"b" * 500, fin=False) + frame(OP_CONTINUATION, b"c" * 500)
    assert feed_all(parser, data) == [(OP_TEXT, b"a" * 1000), (OP_TEXT, b"b" * 500 + b"c" * 500)]


# --- fragments ---------------------------------------------------------------------


def test_fragments_are_reassembled() -> None:
    parser = FrameParser(1024)
    data = (
        frame(OP_TEXT, b"Hel", fin=False)
        + frame(OP_CONTINUATION, b"", fin=False)
        + frame(OP_CONTINUATION, b"lo", fin=False)
        + frame(OP_CONTINUATION, b"!")
        + frame(OP_BINARY, b"\x01", fin=False)
        + frame(OP_CONTINUATION, b"\x02")
    )
    assert feed_all(parser, data, 3) == [(OP_TEXT, b"Hello!"), (OP_BINARY, b"\x01\x02")]
    assert parser.buffered == 0


def test_fragments_count_as_buffered_until_the_message_is_whole() -> None:
    parser = FrameParser(1024)
    assert feed_all(parser, frame(OP_BINARY, b"abc", fin=False)) == []
    assert parser.buffered == 3


def test_control_frames_between_fragments_come_out_at_once() -> None:
    parser = FrameParser(1024)
    assert feed_all(parser, frame(OP_TEXT, b"frag", fin=False) + frame(OP_PING, b"1")) == [
        (OP_PING, b"1")
    ]
    assert feed_all(parser, frame(OP_CONTINUATION, b"ment", fin=False) + frame(OP_PONG)) == [
        (OP_PONG, b"")
    ]
    assert feed_all(parser, frame(OP_CLOSE, b"") + frame(OP_CONTINUATION, b"ed")) == [
        (OP_CLOSE, b""),
        (OP_TEXT, b"fragmented"),
    ]


def test_a_character_may_be_split_across_fragments() -> None:
    text = "€😀".encode()  # 3 + 4 bytes
    data = b"".join(
        frame(OP_TEXT if i == 0 else OP_CONTINUATION, text[i : i + 1], fin=i == len(text) - 1)
        for i in range(len(text))
    )
    assert feed_all(FrameParser(1024), data) == [(OP_TEXT, text)]


# --- 1002: protocol errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(frame(OP_TEXT, b"hi", masked=False), id="unmasked"),
        pytest.param(frame(OP_PING, b"", masked=False), id="unmasked-ping"),
        pytest.param(frame(OP_TEXT, b"hi", rsv=4), id="rsv1"),
        pytest.param(frame(OP_TEXT, b"hi", rsv=2), id="rsv2"),
        pytest.param(frame(OP_TEXT, b"hi", rsv=1), id="rsv3"),
        pytest.param(frame(OP_PING, b"", rsv=7), id="rsv-on-control"),
        *(pytest.param(frame(op, b"x"), id=f"opcode-{op:x}") for op in (3, 4, 5, 6, 7)),
        *(pytest.param(frame(op, b"x"), id=f"opcode-{op:x}") for op in (0xB, 0xC, 0xD, 0xE, 0xF)),
        pytest.param(frame(OP_PING, b"x" * 126), id="long-ping"),
        pytest.param(frame(OP_CLOSE, b"\x03\xe8" + b"x" * 124), id="long-close"),
        pytest.param(frame(OP_PONG, b"x" * 65536), id="pong-64-bit-length"),
        pytest.param(frame(OP_PING, b"x", fin=False), id="fragmented-ping"),
        pytest.param(frame(OP_CLOSE, b"", fin=False), id="fragmented-close"),
        pytest.param(frame(OP_CONTINUATION, b"x"), id="continuation-without-start"),
        pytest.param(frame(OP_CONTINUATION, b"x", fin=False), id="continuation-without-start-2"),
        pytest.param(
            frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), id="text-during-fragments"
        ),
        pytest.param(
            frame(OP_BINARY, b"a", fin=False) + frame(OP_BINARY, b"b", fin=False),
            id="binary-during-fragments",
        ),
        pytest.param(
            frame(OP_TEXT, b"a") + frame(OP_CONTINUATION, b"b"), id="continuation-after-end"
        ),
    ],
)
def test_protocol_errors_are_1002(data: bytes) -> None:
    assert protocol_error(FrameParser(1 << 20), data).code == PROTOCOL_ERROR


def test_a_64_bit_length_with_its_top_bit_set_is_1002() -> None:
    head = struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 63) + MASK
    error = protocol_error(FrameParser(1 << 62), head)
    assert error.code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(frame(OP_CONTINUATION, b"", length=1 << 40)[:2], id="continuation"),
        pytest.param(frame(0x3, b"", length=1 << 40)[:2], id="reserved-opcode"),
        pytest.param(frame(OP_TEXT, b"", length=1 << 40, rsv=4)[:2], id="rsv1"),
        pytest.param(frame(OP_TEXT, b"", length=1 << 40, masked=False)[:2], id="unmasked"),
        pytest.param(frame(OP_PING, b"", length=1 << 40)[:2], id="long-control"),
    ],
)
def test_protocol_errors_are_found_at_the_header(header: bytes) -> None:
    """A frame that will be refused is refused before its payload is buffered."""
    assert protocol_error(FrameParser(1 << 20), header).code == PROTOCOL_ERROR


def test_a_new_message_during_fragments_is_refused_at_its_header() -> None:
    parser = FrameParser(1 << 20)
    assert feed_all(parser, frame(OP_TEXT, b"a", fin=False)) == []
    header = frame(OP_BINARY, b"", length=500_000)[:8]
    assert protocol_error(parser, header).code == PROTOCOL_ERROR


# --- 1007: text that is not UTF-8 ----------------------------------------------------

BAD_UTF8 = [
    b"\xff",
    b"\xc0\xaf",  # overlong "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"hello \xce",  # cut in the middle of a character
    "κόσμε".encode() + b"\xed\xa0\x80edited",
]


@pytest.mark.parametrize("payload", BAD_UTF8)
def test_text_that_is_not_utf8_is_1007(payload: bytes) -> None:
    assert protocol_error(FrameParser(1024), frame(OP_TEXT, payload)).code == INVALID_DATA


@pytest.mark.parametrize("payload", BAD_UTF8)
def test_binary_messages_are_not_checked(payload: bytes) -> None:
    assert feed_all(FrameParser(1024), frame(OP_BINARY, payload)) == [(OP_BINARY, payload)]


@pytest.mark.parametrize("payload", BAD_UTF8)
def test_fragmented_text_that_is_not_utf8_is_1007(payload: bytes) -> None:
    data = b"".join(
        frame(OP_TEXT if i == 0 else OP_CONTINUATION, payload[i : i + 1], fin=False)
        for i in range(len(payload))
    )
    data += frame(OP_CONTINUATION, b"")
    assert protocol_error(FrameParser(1024), data).code == INVALID_DATA


def test_bad_utf8_in_a_fragment_fails_before_the_message_ends() -> None:
    """Autobahn 6.4.1: fail fast, not when the last fragment arrives."""
    parser = FrameParser(1024)
    assert feed_all(parser, frame(OP_TEXT, "κόσμε".encode(), fin=False)) == []
    error = protocol_error(parser, frame(OP_CONTINUATION, b"\xf4\x90\x80\x80", fin=False))
    assert error.code == INVALID_DATA


def test_a_character_cut_at_the_end_of_a_fragment_waits_for_the_next() -> None:
    parser = FrameParser(1024)
    assert feed_all(parser, frame(OP_TEXT, b"\xe2\x82", fin=False)) == []
    assert protocol_error(parser, frame(OP_CONTINUATION, b"x")).code == INVALID_DATA


def test_close_ping_and_pong_payloads_are_not_checked_as_text() -> None:
    data = frame(OP_PING, b"\xff") + frame(OP_PONG, b"\xff")
    assert feed_all(FrameParser(1024), data) == [(OP_PING, b"\xff"), (OP_PONG, b"\xff")]


# --- 1009: too big -------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(frame(OP_TEXT, b"", length=1001)[:8], id="16-bit-length"),
        pytest.param(frame(OP_BINARY, b"", length=1 << 40)[:14], id="64-bit-length"),
        pytest.param(frame(OP_TEXT, b"", length=(1 << 63) - 1)[:10], id="largest-length"),
        pytest.param(frame(OP_BINARY, b"", length=1001)[:4], id="header-without-mask"),
    ],
)
def test_a_message_over_the_limit_is_1009_at_its_header(header: bytes) -> None:
    """Refused as soon as the length is known: the payload is never waited for."""
    parser = FrameParser(1000)
    assert protocol_error(parser, header).code == MESSAGE_TOO_BIG


def test_fragments_adding_up_over_the_limit_are_1009_at_the_last_header() -> None:
    parser = FrameParser(1000)
    assert feed_all(parser, frame(OP_BINARY, b"a" * 600, fin=False)) == []
    assert feed_all(parser, frame(OP_CONTINUATION, b"b" * 300, fin=False)) == []
    header = frame(OP_CONTINUATION, b"", length=101)[:2]
    assert protocol_error(parser, header).code == MESSAGE_TOO_BIG


def test_control_frames_do_not_count_against_the_message_limit() -> None:
    parser = FrameParser(10)
    data = frame(OP_TEXT, b"a" * 10, fin=False) + frame(OP_PING, b"p" * 125)
    assert feed_all(parser, data) == [(OP_PING, b"p" * 125)]


# --- close frames --------------------------------------------------------------------


VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
VALID_CODES += [3000, 3999, 4000, 4001, 4999]
INVALID_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CODES)
def test_valid_close_codes(code: int) -> None:
    assert valid_close_code(code)
    assert parse_close(code.to_bytes(2, "big") + "bye ✓".encode()) == (code, "bye ✓")


@pytest.mark.parametrize("code", INVALID_CODES)
def test_invalid_close_codes_are_1002(code: int) -> None:
    assert not valid_close_code(code)
    with pytest.raises(WebSocketError) as caught:
        parse_close(code.to_bytes(2, "big"))
    assert caught.value.code == PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (None, "")),
        (b"\x03\xe8", (1000, "")),
        (b"\x0f\xa0" + "Grüße".encode(), (4000, "Grüße")),
    ],
)
def test_parse_close(payload: bytes, expected: tuple[int | None, str]) -> None:
    assert parse_close(payload) == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x03", PROTOCOL_ERROR),  # one byte: half a code
        (b"\x03\xe8\xff", INVALID_DATA),
        (b"\x03\xe8hello\xed\xa0\x80", INVALID_DATA),
    ],
)
def test_bad_close_payloads(payload: bytes, code: int) -> None:
    with pytest.raises(WebSocketError) as caught:
        parse_close(payload)
    assert caught.value.code == code


def test_parser_keeps_its_state_in_slots() -> None:
    parser: Any = FrameParser(1024)
    assert not hasattr(parser, "__dict__")
    with pytest.raises(AttributeError):
        parser.anything = 1
