"""An MLLP listener playing the RIS: python-hl7's asyncio server (``hl7.mllp``) on loopback.

Each message received is kept as bytes and as text (decoded as UTF-8, which covers both
character sets the node sends); the answer is the next scripted one: ``AA``, ``AE``,
``AR``, ``CA``, ``silence`` (no answer; the connection stays open until the sender gives up)
``wrong-id`` (AA for another control ID), ``garbage`` (an MLLP block that is not HL7) or
``unframed`` (bytes without the MLLP start block); ``CODE:text`` adds MSA-3 text. Once the
script is used up it answers ``AA``.
The ACKs are made by the library (``hl7.Message.create_ack``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import hl7  # type: ignore[import-untyped]
from hl7.mllp import start_hl7_server  # type: ignore[import-untyped]


class MllpListener:
    """A python-hl7 MLLP server in a thread with its own event loop."""

    def __init__(self, script: Sequence[str] = ()) -> None:
        self.script = list(script)
        self.received: list[str] = []
        self.blocks: list[bytes] = []
        self.answers: list[str] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> MllpListener:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            start_hl7_server(self._on_client, "127.0.0.1", 0, encoding="utf-8"), self._loop
        ).result(timeout=10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def add(self, *answers: str) -> None:
        """Script the next answers."""
        with self._lock:
            self.script.extend(answers)

    def messages(self) -> list[str]:
        with self._lock:
            return list(self.received)

    def raw(self) -> list[bytes]:
        """The MLLP blocks received, as bytes (what a RIS decodes per MSH-18)."""
        with self._lock:
            return list(self.blocks)

    async def _on_client(self, reader: Any, writer: Any) -> None:
        try:
            while True:
                try:
                    block = await reader.readblock()
                except asyncio.IncompleteReadError:
                    return  # the sender closed the connection
                message = hl7.parse(block, encoding="utf-8")  # MSH-18: UTF-8 or ASCII
                with self._lock:
                    self.blocks.append(block)
                    self.received.append(str(message))
                    answer = self.script.pop(0) if self.script else "AA"
                    self.answers.append(answer)
                if answer == "silence":
                    await reader.read()  # until the sender gives up and closes
                    return
                if answer == "garbage":
                    writer.writeblock(b"this is not HL7")
                    await writer.drain()
                    continue
                if answer == "unframed":
                    writer.write(b"MSA|AA|X\x1c\r")
                    await writer.drain()
                    continue
                if answer == "wrong-id":
                    ack = hl7.parse(str(message.create_ack("AA", message_id="ACK1")).replace(
                        f"MSA|AA|{message.segment('MSH')(10)}", "MSA|AA|NOT-THIS-ONE"))
                else:
                    code, _, text = answer.partition(":")
                    ack = message.create_ack(code, message_id="ACK1")
                    if text:  # MSA is the ACK's last segment: its third field
                        ack = hl7.parse(str(ack).rstrip("\r") + "|" + text + "\r")
                writer.writemessage(ack)
                await writer.drain()
        finally:
            writer.close()
