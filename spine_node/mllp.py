"""Send one stored HL7 v2 message over MLLP and judge the peer's acknowledgment.

The python-hl7 library frames the message (``hl7.mllp.open_hl7_connection``: start block
0x0B, end block 0x1C 0x0D) and parses the answer; one connection per message, each step
bounded by the destination's ``timeout_s``. Only an ACK whose MSA-1 is ``AA`` (application
accept; or ``CA``, commit accept, from an engine in enhanced mode that took the message
over) and whose MSA-2 echoes our Message Control ID counts as delivered; ``AE`` / ``AR`` /
``CE`` / ``CR``, another control ID, an unreadable answer, a refused connection and a
timeout are failures the dispatcher retries with backoff, then makes dead. The bytes on the
wire are in the message's own character set (MSH-18: UTF-8, or ASCII when empty); the answer
is read as UTF-8, unreadable bytes replaced.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import hl7  # type: ignore[import-untyped]
from hl7.exceptions import HL7Exception  # type: ignore[import-untyped]
from hl7.mllp import InvalidBlockError, open_hl7_connection  # type: ignore[import-untyped]

from spine_node.oru import CODECS

#: MSA-1 codes that count as delivered (HL7 table 0008).
ACCEPTED = frozenset({"AA", "CA"})


class Hl7DeliveryError(RuntimeError):
    """A message was not accepted: no connection, no answer in time, or a negative ACK.

    The message names what happened (never text from the peer); ``detail`` holds the peer's
    own words (MSA-3, ERR-8), which may name the patient: stored for the operator, not logged.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class Acknowledgment:
    """The MSA of a peer's ACK.

    Attributes
    ----------
    code : str
        MSA-1 (``AA``, ``AE``, ``AR``, ``CA``, ``CE``, ``CR``).
    control_id : str
        MSA-2, the Message Control ID acknowledged.
    text : str
        MSA-3 and ERR-8 (user message) when the peer gave them, else empty.
    """

    code: str
    control_id: str
    text: str = ""


def message_control_id(message: str) -> str:
    """MSH-10 of an ER7 message (parsed with python-hl7).

    Raises
    ------
    ValueError
        When the text is not an HL7 message with an MSH segment.
    """
    try:
        return str(hl7.parse(message).segment("MSH")(10))
    except Exception as exc:
        raise ValueError(f"not an HL7 message with an MSH segment: {exc}") from None


def message_codec(message: str) -> str:
    """The Python codec of an ER7 message's character set (MSH-18; empty: ASCII).

    Raises
    ------
    ValueError
        When MSH-18 names a character set the node does not send, or the message has
        characters that set cannot hold.
    """
    msh = hl7.parse(message).segment("MSH")
    charset = str(msh(18)) if len(msh) > 18 else ""
    codec = CODECS.get(charset)
    if codec is None:
        raise ValueError(f"MSH-18 {charset!r} is not one of {sorted(CODECS)}")
    try:
        message.encode(codec)
    except UnicodeEncodeError as exc:
        raise ValueError(f"the message has characters outside MSH-18 {charset!r}: {exc}") from None
    return codec


def read_acknowledgment(answer: hl7.Message) -> Acknowledgment:
    """The MSA of a parsed answer.

    Raises
    ------
    Hl7DeliveryError
        When the answer has no MSA segment.
    """
    try:
        msa = answer.segment("MSA")
    except KeyError:
        raise Hl7DeliveryError("the answer has no MSA segment (not an acknowledgment)") from None
    if len(msa) < 2:
        raise Hl7DeliveryError("the answer's MSA segment has no acknowledgment code")
    text = [str(msa(3)) if len(msa) > 3 else ""]
    try:
        err = answer.segment("ERR")
        text.append(str(err(8)) if len(err) > 8 else "")
    except KeyError:
        pass
    return Acknowledgment(
        code=str(msa(1)),
        control_id=str(msa(2)) if len(msa) > 2 else "",
        text="; ".join(t for t in text if t),
    )


async def _exchange(
    host: str, port: int, message: str, codec: str, timeout_s: float
) -> hl7.Message:
    try:
        reader, writer = await asyncio.wait_for(
            open_hl7_connection(host, port, encoding="utf-8", encoding_errors="replace"),
            timeout_s,
        )
    except TimeoutError:
        raise Hl7DeliveryError(f"no MLLP connection to {host}:{port} within {timeout_s:g} s") from None
    except OSError as exc:
        raise Hl7DeliveryError(f"no MLLP connection to {host}:{port}: {exc}") from None
    try:
        writer.encoding = codec  # the bytes in the message's own character set (MSH-18)
        writer.writemessage(message)
        await asyncio.wait_for(writer.drain(), timeout_s)
        return await asyncio.wait_for(reader.readmessage(), timeout_s)
    except TimeoutError:
        raise Hl7DeliveryError(f"no acknowledgment from {host}:{port} within {timeout_s:g} s") from None
    except asyncio.IncompleteReadError:
        raise Hl7DeliveryError(f"{host}:{port} closed the connection without an acknowledgment") from None
    except (OSError, ValueError) as exc:  # a reset connection, or an answer over the limit
        raise Hl7DeliveryError(f"no readable acknowledgment from {host}:{port}: {exc}") from None
    except (InvalidBlockError, HL7Exception):  # not an MLLP block, or not an HL7 message
        raise Hl7DeliveryError(f"the answer from {host}:{port} is not an HL7 message") from None
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout_s)
        except (OSError, TimeoutError):
            pass


def send_message(host: str, port: int, message: str, timeout_s: float) -> Acknowledgment:
    """Send ``message`` over MLLP and return the peer's accepting acknowledgment.

    Parameters
    ----------
    host, port : str, int
        The peer's MLLP listener.
    message : str
        An ER7 message (segments separated by carriage returns).
    timeout_s : float
        Bound on connecting, sending and waiting for the ACK (each).

    Returns
    -------
    Acknowledgment
        Its code is ``AA`` or ``CA`` and it acknowledges this message's control ID.

    Raises
    ------
    Hl7DeliveryError
        No connection, no (readable) ACK in time, a negative ACK or another control ID.
    ValueError
        When ``message`` has no MSH segment, or characters its MSH-18 cannot hold.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    expected = message_control_id(message)
    codec = message_codec(message)
    answer = asyncio.run(_exchange(host, port, message, codec, timeout_s))
    ack = read_acknowledgment(answer)
    if ack.code not in ACCEPTED:
        raise Hl7DeliveryError(f"ACK {ack.code or '(empty MSA-1)'}", ack.text)
    if ack.control_id != expected:
        raise Hl7DeliveryError(
            f"ACK {ack.code} acknowledges control ID {ack.control_id!r}, not {expected!r}"
        )
    return ack
