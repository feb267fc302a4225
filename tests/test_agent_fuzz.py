"""A hostile fake guest agent against the host's agent client, for a minute (issue 17).

Root in the guest can replace the agent, so the host must survive anything a
guest sends. A fake agent, in this process, speaks to
:class:`vmcache.agent_client.AgentConnection` over a real socket pair and, session after
session, sends random frames, mutated valid frames (bit flips, truncations,
wrong lengths, reserved bits, bad channels), replies whose every field has a
wrong type or an out-of-range value, frames for streams never opened or
finished (1 MiB each, in floods), credit abuse (data past the window, window
overflows) and adversarial orders (END before REPLY, two REPLYs, data after
EOF, ...), mixed with enough good behaviour to drive the host's streams deep
into their life. Meanwhile up to three host tasks call the public API (start,
ping, run, open_process and its streams, read_file, open_file, write_file,
mkdir, entropy, clock, online_resources) under random deadlines.

Asserted, as a user of the host library would see it:

* nothing but :class:`AgentError` (and subclasses) escapes a host call; the
  process streams may also raise trio's ``BrokenResourceError`` /
  ``ClosedResourceError`` (their documented contract, as :class:`trio.Process`),
  and run() / read_file() their documented size-limit error;
* what the calls return has the documented types (ints, bytes, str);
* the event loop never runs one host task step for longer than
  :data:`MAX_STEP` (measured as the thread's CPU time of the step, because on a
  shared machine wall time also counts the time the OS gave to other processes;
  the wall-time maximum is reported beside it). One step in the run may take up
  to :data:`NOISE_MARGIN` times it: in one CI run of the whole suite a single step
  measured 52.7 ms where every local run of the same code stayed under 27 ms
  (the machine is a shared VM); a host bug of the kind this test is for (decoding a
  hostile frame whole, copying an endless output) blocks every time its frame
  comes, and for 150-400 ms on the code before issue 17. The collector's share
  of each slow step is reported, to tell a garbage collection from host code;
* the process's peak RSS grows by at most :data:`MEMORY_BOUND` over the run.

The frames are built from the documented layout (docs/agent-protocol.md), not
from vmcache's encoder, so the test does not depend on the protocol module's
internals. ``VMCACHE_FUZZ_SECONDS`` sets the duration (default 60),
``VMCACHE_FUZZ_SEED`` replays a run (its choices; the interleaving with the
socket may differ); the seed is printed with every failure.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import random
import socket
import struct
import time
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import vmcache.errors
from vmcache.agent_client import AgentConnection, CompletedProcess, GuestResources, PtySize
from vmcache.errors import AgentError, GuestRequestError

#: Total fuzzing time, seconds.
DURATION = float(os.environ.get("VMCACHE_FUZZ_SECONDS", "60"))
#: The longest a single step of a host task may run (CPU time of the thread).
MAX_STEP = 0.050
#: The one step a run may lose to the machine's noise may take up to this many MAX_STEPs.
NOISE_MARGIN = 2.0
#: How much the process's peak RSS may grow over the run. The host legitimately
#: holds one window (4 MiB) per output channel of each open stream, and run()
#: its size-limited output; the fake agent offers run() up to ENDLESS bytes.
MEMORY_BOUND = 256 << 20
#: The output an "endless" fake process offers (with credit, well-formed).
ENDLESS = 512 << 20

# --- The wire format, from docs/agent-protocol.md -----------------------------------------------

MAGIC = b"\xa7\xf1vmcache-agent\x00"
HEADER = struct.Struct("!BBHII")  # type, channel, reserved, stream, length
HELLO, REQUEST, REPLY, END, DATA, EOF, WINDOW, CONTROL, RESET, PING, PONG, ERROR = range(1, 13)
MAX_PAYLOAD = 1 << 20
MAX_WINDOW = 1 << 30
NONCE_SIZE = 16
STDIN, STDOUT, STDERR = 0, 1, 2
NAMES = {1: "HELLO", 2: "REQUEST", 3: "REPLY", 4: "END", 5: "DATA", 6: "EOF", 7: "WINDOW", 8: "CONTROL",
         9: "RESET", 10: "PING", 11: "PONG", 12: "ERROR"}


def frame(kind: int, stream: int = 0, payload: bytes = b"", channel: int = 0, *, reserved: int = 0,
          length: int | None = None) -> bytes:
    """One frame, any field as given (so also invalid ones)."""
    size = len(payload) if length is None else length
    return HEADER.pack(kind & 0xFF, channel & 0xFF, reserved & 0xFFFF, stream & 0xFFFFFFFF,
                       size & 0xFFFFFFFF) + payload


def pack(value: Any) -> bytes:
    """A value in the protocol's tagged encoding (ints are int64: wider ones are cut to 64 bits)."""
    if value is None:
        return b"N"
    if value is True:
        return b"T"
    if value is False:
        return b"F"
    if isinstance(value, int):
        return b"i" + struct.pack("!Q", value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"d" + struct.pack("!d", value)
    if isinstance(value, bytes):
        return b"b" + struct.pack("!I", len(value)) + value
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        return b"s" + struct.pack("!I", len(raw)) + raw
    if isinstance(value, list):
        return b"l" + struct.pack("!I", len(value)) + b"".join(pack(item) for item in value)
    if isinstance(value, dict):
        return b"m" + struct.pack("!I", len(value)) + b"".join(
            pack(key) + pack(item) for key, item in value.items())
    raise TypeError(type(value))


def unpack(data: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode a value the host sent (trusted: the host is the code under test, not the fuzzer)."""
    tag = data[pos:pos + 1]
    pos += 1
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], pos
    if tag == b"i":
        return struct.unpack_from("!q", data, pos)[0], pos + 8
    if tag == b"d":
        return struct.unpack_from("!d", data, pos)[0], pos + 8
    (count,) = struct.unpack_from("!I", data, pos)
    pos += 4
    if tag == b"b":
        return data[pos:pos + count], pos + count
    if tag == b"s":
        return data[pos:pos + count].decode("utf-8", "surrogateescape"), pos + count
    items: list[Any] = []
    for _ in range(count * (2 if tag == b"m" else 1)):
        item, pos = unpack(data, pos)
        items.append(item)
    if tag == b"l":
        return items, pos
    return dict(zip(items[::2], items[1::2], strict=True)), pos


def expensive_value(size: int) -> bytes:
    """A valid value of ``size`` bytes that is as costly as possible to decode (empty lists)."""
    count = (size - 5) // 5
    return b"l" + struct.pack("!I", count) + b"l\0\0\0\0" * count


def deep_value(depth: int) -> bytes:
    return b"l\0\0\0\x01" * depth + b"N"


EXPENSIVE = {size: expensive_value(size) for size in (4096, 64 << 10, MAX_PAYLOAD)}

HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**32, 2**32 + 1, 2**63 - 1, -2**63, 0.5, -0.0,
    float("nan"), float("inf"), float("-inf"), 1e308, "", "x", "12", "-3", "\udcff", "y" * 5000,
    b"", b"\xff\x00", b"12", [], [1], [None, None], [[[[]]]], {}, {"k": "v"}, {"error": 1},
]


def hostile(rng: random.Random) -> Any:
    return rng.choice(HOSTILE)


# --- The fake agent ------------------------------------------------------------------------------


class FakeStream:
    """What the fake agent knows of one stream the host opened."""

    def __init__(self, stream_id: int, body: dict[str, Any]) -> None:
        self.id = stream_id
        self.body = body
        self.op = body.get("op")
        window = body.get("window")
        self.outputs: list[int] = []
        if self.op == "exec":
            self.outputs = [channel for channel, key in ((STDOUT, "stdout"), (STDERR, "stderr"))
                            if body.get(key) and not (channel == STDERR and body.get("pty"))]
        elif self.op == "read_file":
            self.outputs = [STDOUT]
        self.credit = dict.fromkeys(self.outputs, window if isinstance(window, int) else 0)
        self.credit_changed = trio.Event()
        self.stdin_bytes = 0
        self.stdin_ungranted = 0
        self.stdin_eof = trio.Event()
        self.signalled = trio.Event()
        self.scope = trio.CancelScope()


class FakeAgent:
    """A guest agent with a taste for mischief; ``fault`` is the chance that an answer is bad."""

    def __init__(self, rng: random.Random, stream: trio.SocketStream, fault: float, chaos: float,
                 endless: bool, stats: Counter[str]) -> None:
        self.rng = rng
        self.stream = stream
        self.fault = fault
        self.chaos = chaos
        self.endless = endless
        self.stats = stats
        self.streams: dict[int, FakeStream] = {}
        self.finished: deque[int] = deque(maxlen=64)
        self.highest = 0
        self.outbox: deque[bytes] = deque()
        self.outbox_bytes = 0
        self.posted = trio.Event()
        self.drained = trio.Event()
        self.nonces: list[bytes] = []
        #: The last things sent, for the failure report.
        self.recent: deque[str] = deque(maxlen=12)

    # Sending: the reader never blocks on the socket (the host may be blocked sending to us).

    def post(self, data: bytes, what: str) -> None:
        self.outbox.append(data)
        self.outbox_bytes += len(data)
        self.recent.append(what)
        self.stats["sent " + what.split(" ", 1)[0]] += 1
        self.posted.set()

    async def send(self, data: bytes, what: str) -> None:
        """Post once the outbox is small (bounds the fake agent's own memory)."""
        while self.outbox_bytes > 8 << 20:
            self.drained = trio.Event()
            await self.drained.wait()
        self.post(data, what)
        await trio.lowlevel.checkpoint()

    async def writer(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                while not self.outbox:
                    self.posted = trio.Event()
                    await self.posted.wait()
                data = self.outbox.popleft()
                await self.stream.send_all(data)
                self.outbox_bytes -= len(data)
                self.drained.set()

    def bad(self) -> bool:
        return self.rng.random() < self.fault

    # Mutations.

    def mutate_frame(self, data: bytes) -> tuple[bytes, str]:
        rng = self.rng
        how = rng.randrange(7)
        if how == 0:
            out = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
            return bytes(out), "bitflip"
        if how == 1:
            return data[:rng.randrange(len(data))], "truncated"
        start = data.find(MAGIC) + len(MAGIC) if data.startswith(MAGIC) else 0
        kind, channel, reserved, stream, length = HEADER.unpack_from(data, start)
        payload = data[start + HEADER.size:]
        if how == 2:
            length = rng.choice([length + 1, max(0, length - 1), length * 2 + 7, 0xFFFFFFFF,
                                 MAX_PAYLOAD + 1, rng.getrandbits(32)])
        elif how == 3:
            reserved = rng.randint(1, 0xFFFF)
        elif how == 4:
            channel = rng.randint(0, 255)
        elif how == 5:
            kind = rng.choice([0, 13, 255, rng.randint(1, 12)])
        else:
            stream = rng.choice([0, 0xFFFFFFFF, stream + 1, rng.getrandbits(32)])
        mutated = data[:start] + HEADER.pack(kind, channel, reserved, stream, length & 0xFFFFFFFF) + payload
        return mutated, ["", "", "length", "reserved", "channel", "type", "stream"][how]

    def mutate_body(self, body: dict[str, Any]) -> Any:
        rng = self.rng
        body = dict(body)
        how = rng.randrange(6)
        if how == 0 or not body:
            body[rng.choice(["pid", "window", "mode", "size", "returncode", "timed_out", "online_cpus",
                             "mem_total_kib", "problems", "boot_id", "error", "errno"])] = hostile(rng)
        elif how == 1:
            body[rng.choice(list(body))] = hostile(rng)
        elif how == 2:
            del body[rng.choice(list(body))]
        elif how == 3:
            body["error"] = hostile(rng) if rng.random() < 0.5 else "refused"
            body["errno"] = hostile(rng)
        elif how == 4:
            for key in body:
                body[key] = hostile(rng)
        else:
            return rng.choice([[], [1, 2], 0, "text", None, b"raw", 1.5])
        return body

    def message(self, kind: int, stream: int, body: dict[str, Any]) -> tuple[bytes, str]:
        """A REPLY/END frame; sometimes a mutated body, sometimes a mutated frame."""
        name = NAMES[kind]
        if self.bad():
            value = self.mutate_body(body)
            if self.rng.random() < 0.3:
                return self.mutate_frame(frame(kind, stream, pack(value)))[0], f"{name} mutated frame"
            return frame(kind, stream, pack(value)), f"{name} {value!r:.80}"
        return frame(kind, stream, pack(body)), f"{name} {body!r:.80}"

    # Unsolicited frames.

    def random_frame(self) -> tuple[bytes, str]:
        rng = self.rng
        choice = rng.randrange(14)
        known = [*self.streams, *self.finished]
        target = rng.choice(known) if known and rng.random() < 0.5 else rng.choice(
            [self.highest + rng.randint(1, 1000), rng.getrandbits(32), 0xFFFFFFFF])
        if choice == 0:
            return rng.randbytes(rng.randint(1, 4096)), "garbage bytes"
        if choice == 1:
            return frame(rng.randint(0, 255), rng.getrandbits(32), rng.randbytes(rng.randint(0, 64)),
                         rng.randint(0, 3)), "random header"
        if choice == 2:
            return frame(rng.choice([REPLY, END]), target, rng.randbytes(rng.randint(0, 256))), \
                "REPLY/END random payload"
        if choice == 3:
            return frame(rng.choice([REPLY, END]), target, pack(self.mutate_body({"pid": 1}))), \
                "REPLY/END hostile body"
        if choice == 4:
            return frame(DATA, target, rng.randbytes(rng.randint(0, 4096)), rng.randint(0, 2)), "DATA stray"
        if choice == 5:
            return frame(EOF, target, b"", rng.randint(0, 3)), "EOF stray"
        if choice == 6:
            increment = rng.choice([0, 1, MAX_WINDOW, MAX_WINDOW + 1, 0xFFFFFFFF, rng.getrandbits(32)])
            return frame(WINDOW, target, struct.pack("!I", increment), rng.randint(0, 2)), \
                f"WINDOW {increment}"
        if choice == 7:
            payload = rng.choice([pack([b"x" * 8, "boot"]), pack([1, 2]), pack(None), rng.randbytes(9),
                                  pack([b"", 5]), pack([b"a", "b", "c"])])
            return frame(PONG, 0, payload), "PONG unsolicited"
        if choice == 8:
            return frame(ERROR, 0, pack(rng.choice([{"message": hostile(rng)}, {}, [1], "x"]))), "ERROR"
        if choice == 9:
            nonce = rng.choice(self.nonces) if self.nonces else rng.randbytes(NONCE_SIZE)
            info = {"protocol": rng.choice([1, 2, "1", None]), "boot_id": hostile(rng)}
            return MAGIC + frame(HELLO, 0, nonce + pack(info)), "HELLO mid-session"
        if choice == 10:
            return frame(rng.choice([REQUEST, CONTROL, RESET, PING]), target or 1, pack({"op": "exec"})), \
                "a host's frame"
        if choice == 11:
            return frame(rng.choice([REPLY, END]), target, deep_value(rng.randint(1, 40))), "deep value"
        if choice == 12:
            return frame(rng.choice([REPLY, END]), target, EXPENSIVE[rng.choice([4096, 64 << 10])]), \
                "REPLY/END big value"
        return self.mutate_frame(frame(rng.choice([REPLY, END]), target, pack({"pid": 3, "window": 9})))

    async def flood(self) -> None:
        """1 MiB frames for streams never opened or already finished."""
        rng = self.rng
        for _ in range(rng.randint(1, 16)):
            known = list(self.finished)
            target = rng.choice(known) if known and rng.random() < 0.5 else self.highest + rng.randint(
                100, 1 << 20)
            kind = rng.choice([REPLY, END, DATA, DATA])
            payload = EXPENSIVE[MAX_PAYLOAD] if kind != DATA else bytes(MAX_PAYLOAD)
            await self.send(frame(kind, target, payload, STDOUT if kind == DATA else 0),
                            f"{NAMES[kind]} 1 MiB flood for stream {target}")

    async def chaos_loop(self) -> None:
        if not self.chaos:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self.rng.expovariate(self.chaos))
            if self.rng.random() < 0.15:
                await self.flood()
            else:
                data, what = self.random_frame()
                await self.send(data, what)

    # Answering the host.

    async def reader(self, nursery: trio.Nursery) -> None:
        buffer = b""
        while True:
            try:
                data = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buffer += data
            while True:
                start = len(MAGIC) if buffer.startswith(MAGIC) else 0
                if len(buffer) < start + HEADER.size:
                    break
                kind, channel, _, stream, length = HEADER.unpack_from(buffer, start)
                end = start + HEADER.size + length
                if len(buffer) < end:
                    break
                payload, buffer = buffer[start + HEADER.size:end], buffer[end:]
                await self.on_frame(nursery, kind, channel, stream, payload)

    async def on_frame(self, nursery: trio.Nursery, kind: int, channel: int, stream_id: int,
                       payload: bytes) -> None:
        rng = self.rng
        self.stats["got " + NAMES.get(kind, str(kind))] += 1
        if kind == HELLO:
            nonce = payload[:NONCE_SIZE]
            self.nonces.append(nonce)
            info: Any = {"protocol": 1, "boot_id": "fake-boot", "agent_version": "fuzz"}
            if rng.random() < 0.3:
                self.post(rng.randbytes(rng.randint(1, 300)), "garbage before HELLO")
            if self.bad():
                if rng.random() < 0.3:
                    return  # no answer: start() times out
                info = self.mutate_body(info)
                if rng.random() < 0.2:
                    nonce = rng.randbytes(NONCE_SIZE)
            hello = MAGIC + frame(HELLO, 0, nonce + pack(info))
            if self.bad() and rng.random() < 0.3:
                hello, how = self.mutate_frame(hello)
                self.post(hello, f"HELLO {how}")
            else:
                self.post(hello, f"HELLO {info!r:.60}")
        elif kind == PING:
            if self.bad():
                if rng.random() < 0.5:
                    return
                self.post(frame(PONG, 0, pack(rng.choice([[payload], [payload, 5], [payload, "b", 1],
                                                          {"p": payload}, [payload[:-1], "b"]]))),
                          "PONG malformed")
            else:
                self.post(frame(PONG, 0, pack([payload, "fake-boot"])), "PONG")
        elif kind == REQUEST:
            body, _ = unpack(payload)
            self.highest = max(self.highest, stream_id)
            fake = FakeStream(stream_id, body)
            self.streams[stream_id] = fake
            nursery.start_soon(self.serve, fake, name="FakeAgent.serve")
        elif kind == DATA:
            target = self.streams.get(stream_id)
            if target is not None:
                fake = target
                fake.stdin_bytes += len(payload)
                fake.stdin_ungranted += len(payload)
                if fake.stdin_ungranted >= 512 << 10 or (self.bad() and rng.random() < 0.2):
                    increment = fake.stdin_ungranted
                    if self.bad():
                        increment = rng.choice([0, MAX_WINDOW, MAX_WINDOW + 1, 0xFFFFFFFF, increment * 4096])
                    fake.stdin_ungranted = 0
                    self.post(frame(WINDOW, stream_id, struct.pack("!I", increment & 0xFFFFFFFF), STDIN),
                              f"WINDOW stdin {increment}")
        elif kind in (EOF, WINDOW, CONTROL, RESET):
            known = self.streams.get(stream_id)
            if known is None:
                return
            if kind == EOF:
                known.stdin_eof.set()
            elif kind == WINDOW and channel in known.credit:
                known.credit[channel] += struct.unpack("!I", payload)[0]
                known.credit_changed.set()
            elif kind == CONTROL:
                known.signalled.set()
            elif kind == RESET:
                del self.streams[stream_id]
                known.scope.cancel()
                self.finished.append(stream_id)
                if self.bad():  # answers for a stream the host forgot
                    self.post(*self.message(rng.choice([REPLY, END]), stream_id, {"returncode": 0}))
                    self.post(frame(DATA, stream_id, b"late", STDOUT), "DATA after RESET")

    def good_reply(self, fake: FakeStream) -> dict[str, Any]:
        rng = self.rng
        if rng.random() < 0.08:
            return {"error": rng.choice(["no such file", "refused"]), "errno": rng.choice([2, 13, 0])}
        op = fake.op
        if op == "exec":
            return {"pid": rng.randint(0, 1 << 22), "window": 2 << 20}
        if op == "read_file":
            return {"mode": 0o644, "size": rng.randint(0, 1 << 20)}
        if op == "write_file":
            return {"window": 4 << 20}
        if op == "online":
            return {"online_cpus": 2, "mem_total_kib": 250000, "problems": rng.choice([[], ["cpu3"]])}
        if op == "ping":
            return {"boot_id": "fake-boot"}
        return {}

    async def serve(self, fake: FakeStream) -> None:
        with fake.scope:
            try:
                await self._serve(fake)
            finally:
                if self.streams.pop(fake.id, None) is not None:
                    self.finished.append(fake.id)

    async def _serve(self, fake: FakeStream) -> None:
        rng = self.rng
        sid = fake.id
        if self.bad():
            script = rng.randrange(12)
            if script == 0:
                self.post(*self.message(END, sid, {"returncode": 0}))  # END before REPLY
            elif script == 1:
                self.post(frame(DATA, sid, b"early", STDOUT), "DATA before REPLY")
            elif script == 2:
                await trio.sleep_forever()  # never answers (pings still answered)
            elif script == 3:
                self.post(frame(REPLY, sid, pack({"pid": 1, "window": 16})), "REPLY")
                self.post(*self.message(REPLY, sid, self.good_reply(fake)))  # a second REPLY
            elif script == 4:
                self.post(frame(REPLY, sid, pack({"error": "no", "errno": 2})), "REPLY error")
                self.post(frame(DATA, sid, b"x" * 100, STDOUT), "DATA after an error REPLY")
                self.post(frame(END, sid, pack({"returncode": 1})), "END after an error REPLY")
                return
            elif script == 5:
                self.post(frame(REPLY, sid, EXPENSIVE[MAX_PAYLOAD]), "REPLY of 1 MiB")
                return
            elif script == 6:
                self.post(frame(REPLY, sid, deep_value(rng.randint(6, 12))), "REPLY deep")
                return
            elif script == 7:  # credit abuse: more than the window on an output
                self.post(frame(REPLY, sid, pack(self.good_reply(fake))), "REPLY")
                window = max(fake.credit.values(), default=4 << 20)
                channel = rng.choice(fake.outputs or [STDOUT])
                sent = 0
                while sent <= window:
                    size = min(MAX_PAYLOAD, window + 1 - sent)
                    await self.send(frame(DATA, sid, bytes(size), channel), "DATA past the window")
                    sent += size
                return
            elif script == 8:  # window overflow on stdin
                self.post(frame(REPLY, sid, pack(self.good_reply(fake))), "REPLY")
                for _ in range(rng.randint(1, 3)):
                    self.post(frame(WINDOW, sid, struct.pack("!I", MAX_WINDOW), STDIN), "WINDOW stdin 1 GiB")
            elif script == 9:
                self.post(frame(EOF, sid, b"", STDIN), "EOF stdin before REPLY")
                self.post(frame(WINDOW, sid, struct.pack("!I", 10), STDIN), "WINDOW stdin before REPLY")
            elif script == 10:
                self.post(frame(DATA, sid, b"to stdin?", STDIN), "DATA on channel 0 from the guest")
                self.post(frame(DATA, sid, b"stderr?", STDERR), "DATA on stderr")
            else:
                self.post(*self.mutate_frame(frame(REPLY, sid, pack(self.good_reply(fake)))))
                return
        reply = self.good_reply(fake)
        self.post(*self.message(REPLY, sid, reply))
        if "error" in reply:
            return
        if fake.op == "write_file":
            await fake.stdin_eof.wait()
            self.post(*self.message(END, sid, {"size": fake.stdin_bytes}))
            return
        if fake.op not in ("exec", "read_file"):
            return
        # Output, within the host's credit (unless a fault says otherwise).
        if self.endless and fake.op == "exec":
            total = ENDLESS
        else:
            total = rng.choice([0, 0, 10, 5000, 300 << 10, 3 << 20, 12 << 20])
        for channel in fake.outputs:
            remaining = total if channel == STDOUT else rng.choice([0, 100])
            while remaining:
                while fake.credit[channel] <= 0:
                    fake.credit_changed = trio.Event()
                    with trio.move_on_after(2):
                        await fake.credit_changed.wait()
                    if fake.credit[channel] <= 0:
                        return  # the host stopped reading
                size = min(remaining, fake.credit[channel], 256 << 10)
                if self.bad() and rng.random() < 0.05:
                    size = fake.credit[channel] + rng.randint(1, 1000)  # past the window
                fake.credit[channel] -= size
                remaining = max(0, remaining - size)
                await self.send(frame(DATA, sid, bytes(min(size, MAX_PAYLOAD)), channel), f"DATA {size}")
            if not self.bad() or rng.random() < 0.5:
                self.post(frame(EOF, sid, b"", channel), "EOF")
            if self.bad():
                self.post(frame(DATA, sid, b"after eof", channel), "DATA after EOF")
        if fake.op == "exec" and rng.random() < 0.3:
            with trio.move_on_after(rng.uniform(0, 1)):
                await fake.signalled.wait()
        body: dict[str, Any] = ({"returncode": rng.choice([0, 1, -9, 255]), "timed_out": rng.random() < 0.1}
                                if fake.op == "exec" else {"size": total})
        self.post(*self.message(END, sid, body))
        if self.bad():
            self.post(*self.message(END, sid, body))  # twice


# --- The host side -------------------------------------------------------------------------------


class StepTimer(trio.abc.Instrument):
    """The longest step of any task but the fake agent's: CPU time of the thread, and wall time."""

    def __init__(self) -> None:
        self.started: tuple[float, float] | None = None
        self.max_cpu = 0.0
        self.over: list[str] = []  # the steps longer than MAX_STEP, described
        self.max_wall = 0.0
        self.context: Callable[[], str] = lambda: ""
        self.gc_time = 0.0  # the collector's CPU time so far
        self.gc_max = 0.0  # its longest collection
        self._gc_started = 0.0
        self._step_gc = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A :data:`gc.callbacks` hook: add up the collector's CPU time."""
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            spent = time.thread_time() - self._gc_started
            self.gc_time += spent
            self.gc_max = max(self.gc_max, spent)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.started = (time.thread_time(), time.perf_counter())
        self._step_gc = self.gc_time

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if "FakeAgent" in task.name or self.started is None:
            return
        cpu = time.thread_time() - self.started[0]
        wall = time.perf_counter() - self.started[1]
        self.max_wall = max(self.max_wall, wall)
        if cpu > MAX_STEP:
            self.over.append(f"{cpu * 1000:.1f} ms CPU in task {task.name} "
                             f"({(self.gc_time - self._step_gc) * 1000:.1f} ms of it garbage collection); "
                             f"the fake agent had sent: {self.context()}")
        self.max_cpu = max(self.max_cpu, cpu)


class Violation(Exception):
    pass


class Findings:
    def __init__(self) -> None:
        self.violations: dict[str, tuple[int, str]] = {}
        self.outcomes: Counter[str] = Counter()

    def add(self, key: str, detail: str) -> None:
        count, first = self.violations.get(key, (0, detail))
        self.violations[key] = (count + 1, first)


ALLOWED_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
#: What run() and read_file() raise past their documented size limit (issue 17 asks for one),
#: where this vmcache has it: an allowed outcome of those two calls, and of them only.
OUTPUT_LIMIT_ERRORS: tuple[type[Exception], ...] = tuple(
    error for error in (getattr(vmcache.errors, "GuestOutputLimitError", None),)
    if isinstance(error, type) and issubclass(error, Exception))


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Violation(what)


class Host:
    """Host tasks calling the public API at random, recording anything but AgentError."""

    def __init__(self, rng: random.Random, findings: Findings, agent: FakeAgent, session: str) -> None:
        self.rng = rng
        self.findings = findings
        self.agent = agent
        self.session = session

    async def guarded(self, name: str, call: Callable[[], Awaitable[None]], streams_ok: bool = False) -> bool:
        """Run one host call; True if the connection looks alive afterwards."""
        try:
            await call()
        except OUTPUT_LIMIT_ERRORS as error:
            if name not in ("run", "read_file"):
                self.record(name, error)
            self.findings.outcomes[f"{name}: {type(error).__name__}"] += 1
        except AgentError as error:
            self.findings.outcomes[f"{name}: {type(error).__name__}"] += 1
            if isinstance(error, GuestRequestError) and not (error.errno is None or type(error.errno) is int):
                self.record(name, Violation(f"GuestRequestError.errno is {error.errno!r}"))
            return isinstance(error, GuestRequestError)
        except ALLOWED_STREAM_ERRORS as error:
            if not streams_ok:
                self.record(name, error)
            self.findings.outcomes[f"{name}: {type(error).__name__}"] += 1
        except trio.Cancelled:
            self.findings.outcomes[f"{name}: timed out"] += 1
            raise
        except Exception as error:  # what the test is looking for
            self.record(name, error)
            return False
        else:
            self.findings.outcomes[f"{name}: ok"] += 1
        return True

    def record(self, name: str, error: BaseException) -> None:
        frames = traceback.extract_tb(error.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                      if "vmcache" in f.filename), "a check of what it returned")
        key = f"{type(error).__name__} from {name} at {where}"
        detail = (f"{key}: {str(error)[:300]}\n  session {self.session}; the fake agent had sent, last: "
                  f"{list(self.agent.recent)}\n" + "".join(traceback.format_tb(error.__traceback__)))
        self.findings.add(key, detail)

    async def worker(self, connection: AgentConnection, deadline: float) -> None:
        rng = self.rng
        operations = [self.ping, self.run, self.process, self.read_file, self.open_file, self.write_file,
                      self.small_calls]
        dead = 0
        while trio.current_time() < deadline and dead < 5:
            operation = rng.choice(operations)
            # An endless producer's output needs time to be taken whole (or refused past a limit).
            with trio.move_on_after(20.0 if self.agent.endless else rng.choice([0.05, 0.3, 1.0, 3.0])):
                alive = await self.guarded(operation.__name__, functools.partial(operation, connection))
                dead = 0 if alive else dead + 1
            await trio.lowlevel.checkpoint()

    async def ping(self, connection: AgentConnection) -> None:
        boot_id = await connection.ping()
        check(isinstance(boot_id, str), f"ping() returned {boot_id!r}")

    async def run(self, connection: AgentConnection) -> None:
        rng = self.rng
        result = await connection.run(["fuzz"], stdin=rng.choice([b"", b"input", bytes(300 << 10)]),
                                      capture_stdout=rng.random() < 0.9, capture_stderr=rng.random() < 0.5,
                                      timeout=rng.choice([None, 5.0]))
        check(isinstance(result, CompletedProcess), "run() returned no CompletedProcess")
        check(type(result.returncode) is int, f"run().returncode is {result.returncode!r}")
        check(type(result.timed_out) is bool, f"run().timed_out is {result.timed_out!r}")
        for output in (result.stdout, result.stderr):
            check(output is None or type(output) is bytes, f"run() output is a {type(output)}")

    async def process(self, connection: AgentConnection) -> None:
        rng = self.rng
        pty = PtySize() if rng.random() < 0.3 else None
        async with connection.open_process(["fuzz"], pty=pty) as process:
            check(type(process.pid) is int, f"GuestProcess.pid is {process.pid!r}")
            for _ in range(rng.randint(0, 6)):
                action = rng.randrange(6)
                if action == 0 and process.stdout is not None:
                    data = await self.stream_call(process.stdout.receive_some(rng.choice([None, 1, 70000])))
                    check(data is None or type(data) is bytes, f"stdout.receive_some() returned {data!r:.50}")
                elif action == 1 and process.stdin is not None:
                    await self.stream_call(process.stdin.send_all(bytes(rng.choice([1, 5000, 3 << 20]))))
                elif action == 2:
                    await process.send_signal(rng.choice([2, 9, 15]))
                elif action == 3:
                    await process.resize(rng.randint(1, 100), rng.randint(1, 300))
                elif action == 4:
                    status = await process.wait()
                    check(type(status) is int, f"wait() returned {status!r}")
                elif process.stdin is not None:
                    await self.stream_call(process.stdin.aclose())
                returncode = process.returncode
                check(returncode is None or type(returncode) is int, f"returncode is {returncode!r}")
                check(type(process.timed_out) is bool, f"timed_out is {process.timed_out!r}")

    async def stream_call(self, call: Awaitable[Any]) -> Any:
        """A process stream's method: trio's Broken/ClosedResourceError are part of its contract."""
        try:
            return await call
        except ALLOWED_STREAM_ERRORS:
            return None

    async def read_file(self, connection: AgentConnection) -> None:
        data = await connection.read_file("/fuzz/file")
        check(type(data) is bytes, f"read_file() returned a {type(data)}")

    async def open_file(self, connection: AgentConnection) -> None:
        async with connection.open_file("/fuzz/file") as file:
            check(type(file.mode) is int and type(file.size) is int, f"GuestFile mode {file.mode!r} "
                                                                     f"size {file.size!r}")
            for _ in range(self.rng.randint(0, 5)):
                data = await self.stream_call(file.receive_some())
                check(data is None or type(data) is bytes, f"GuestFile.receive_some() returned {data!r:.50}")

    async def write_file(self, connection: AgentConnection) -> None:
        size = await connection.write_file("/fuzz/file", bytes(self.rng.choice([0, 100, 1 << 20, 5 << 20])))
        check(type(size) is int, f"write_file() returned {size!r}")

    async def small_calls(self, connection: AgentConnection) -> None:
        which = self.rng.randrange(4)
        if which == 0:
            await connection.mkdir("/fuzz/dir")
        elif which == 1:
            await connection.add_entropy()
        elif which == 2:
            await connection.set_clock()
        else:
            resources = await connection.online_resources()
            check(isinstance(resources, GuestResources) and type(resources.online_cpus) is int
                  and type(resources.mem_total_kib) is int, f"online_resources() returned {resources!r}")


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.fixture(autouse=True)
def no_leaked_qemu() -> Iterator[None]:
    """Overrides conftest's check: this test starts no QEMU (and other runs' QEMUs are not ours)."""
    yield


async def session(rng: random.Random, findings: Findings, timer: StepTimer, stats: Counter[str],
                  name: str) -> None:
    host_socket, guest_socket = socket.socketpair()
    host_end = trio.SocketStream(trio.socket.from_stdlib_socket(host_socket))
    guest_end = trio.SocketStream(trio.socket.from_stdlib_socket(guest_socket))
    fault = rng.choice([0.0, 0.05, 0.05, 0.15, 0.15, 0.3, 0.6, 1.0])
    chaos = rng.choice([0.0, 0.0, 0.0, 2.0, 20.0, 200.0])
    agent = FakeAgent(rng, guest_end, fault, chaos, endless=rng.random() < 0.05, stats=stats)
    timer.context = lambda: str(list(agent.recent))
    host = Host(rng, findings, agent, f"{name} (fault {fault}, chaos {chaos}, endless {agent.endless})")
    length = rng.uniform(0.2, 2.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.reader, nursery, name="FakeAgent.reader")
        nursery.start_soon(agent.writer, name="FakeAgent.writer")
        connection: list[AgentConnection] = []

        async def start() -> None:
            started = await AgentConnection.start(host_end, timeout=rng.choice([0.2, 0.2, 1.0, 3.0]))
            check(isinstance(started.boot_id, str) and isinstance(started.agent_version, str),
                  f"boot_id {started.boot_id!r}, agent_version {started.agent_version!r}")
            connection.append(started)

        with trio.move_on_after(5):
            await host.guarded("start", start)
        if connection:
            nursery.start_soon(agent.chaos_loop, name="FakeAgent.chaos_loop")
            deadline = trio.current_time() + length
            async with trio.open_nursery() as workers:
                for _ in range(rng.randint(1, 3)):
                    workers.start_soon(host.worker, connection[0], deadline)
            await host.guarded("aclose", connection[0].aclose)
        nursery.cancel_scope.cancel()
    for end in (host_end, guest_end):
        await end.aclose()


async def test_a_hostile_agent_gets_nothing_but_agent_errors() -> None:
    seed = int(os.environ.get("VMCACHE_FUZZ_SEED", "0")) or random.SystemRandom().getrandbits(48)
    replay = f"replay with VMCACHE_FUZZ_SEED={seed} VMCACHE_FUZZ_SECONDS={DURATION:g}"
    rng = random.Random(seed)
    findings = Findings()
    timer = StepTimer()
    stats: Counter[str] = Counter()
    baseline = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    gc.callbacks.append(timer.on_gc)
    trio.lowlevel.add_instrument(timer)
    sessions = 0
    started = time.monotonic()
    try:
        with trio.fail_after(DURATION + 120):
            while time.monotonic() - started < DURATION:
                sessions += 1
                await session(random.Random(rng.getrandbits(64)), findings, timer, stats, f"#{sessions}")
    finally:
        trio.lowlevel.remove_instrument(timer)
        gc.callbacks.remove(timer.on_gc)
    growth = rss("VmHWM") - baseline
    summary = (
        f"seed {seed} ({replay}): {sessions} sessions in {time.monotonic() - started:.0f} s; "
        f"longest host step {timer.max_cpu * 1000:.1f} ms CPU (bound {MAX_STEP * 1000:.0f}), "
        f"{timer.max_wall * 1000:.1f} ms wall; longest garbage collection {timer.gc_max * 1000:.1f} ms; "
        f"peak RSS grew {growth >> 20} MiB (bound {MEMORY_BOUND >> 20})\n"
        f"host calls: {dict(sorted(findings.outcomes.items()))}\nfake agent: {dict(sorted(stats.items()))}")
    print(summary)
    problems = []
    for key, (count, detail) in findings.violations.items():
        problems.append(f"--- {count} x {key}\n{detail}")
    if len(timer.over) > 1 or timer.max_cpu > MAX_STEP * NOISE_MARGIN:
        slow = "\n".join(timer.over[:10])
        problems.append(f"--- the event loop was blocked; steps over the bound:\n{slow}")
    if growth > MEMORY_BOUND:
        problems.append(f"--- memory: the peak RSS grew by {growth >> 20} MiB")
    assert not problems, f"{summary}\n" + "\n".join(problems[:12]) + f"\n{replay}"
    assert not math.isnan(timer.max_cpu)
