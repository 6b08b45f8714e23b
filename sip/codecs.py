"""Codec priorities: the configured codecs in order (G.722 wideband first by default), all others off.

pjsua2 orders codecs by a priority 0-255 (0 disables); the configuration names codecs the way pjsua2
does, "NAME/RATE" (e.g. "G722/16000"), and a name the library does not have is an error that lists the
ones it has.
"""
from __future__ import annotations

from collections.abc import Sequence

import pjsua2 as pj

_TOP_PRIORITY = 255


def _matches(codec_id: str, wanted: str) -> bool:
    # pjsua2 ids carry a channel count ("PCMU/8000/1"); the configuration may leave it out
    cid, want = codec_id.lower(), wanted.lower()
    return cid == want or cid.startswith(want + "/")


def apply_codec_priorities(ep: pj.Endpoint, wanted: Sequence[str]) -> list[str]:
    """Enable `wanted` in that order and disable the rest; returns the pjsua2 ids now enabled, best first."""
    available = [c.codecId for c in ep.codecEnum2()]
    chosen: list[str] = []
    for name in wanted:
        hits = [cid for cid in available if _matches(cid, name)]
        if not hits:
            raise ValueError(f"codec {name!r} is not available; this pjsua2 build has {available}")
        chosen.extend(h for h in hits if h not in chosen)
    for cid in available:
        ep.codecSetPriority(cid, 0)
    for rank, cid in enumerate(chosen):
        ep.codecSetPriority(cid, _TOP_PRIORITY - rank)
    return chosen


# RFC 3551 static payload types of the codecs we may enable
_STATIC_NAMES = {"0": "PCMU", "3": "GSM", "8": "PCMA", "9": "G722"}


def _audio_formats(sdp: str) -> tuple[list[str], dict[str, str]]:
    """Payload types of the first audio m-line, and their codec names (upper case)."""
    fmts: list[str] = []
    names: dict[str, str] = {}
    in_audio = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            if in_audio:
                break
            parts = line[2:].split()
            in_audio = bool(parts) and parts[0] == "audio"
            if in_audio:
                fmts = parts[3:]
        elif in_audio and line.startswith("a=rtpmap:"):
            pt, _, enc = line[len("a=rtpmap:"):].partition(" ")
            names[pt] = enc.split("/", 1)[0].upper()
    for pt in fmts:
        names.setdefault(pt, _STATIC_NAMES.get(pt, ""))
    return fmts, names


def narrow_answer(local_sdp: str, remote_offer: str, priority: Sequence[str]) -> str | None:
    """Our SDP answer reduced to the best codec by OUR priority that the offer carries (+ DTMF events).

    pjmedia's negotiation follows the offerer's codec order, so a caller listing PCMU before G.722 would
    get narrowband although both sides have wideband. Answering with the one codec we prefer makes the
    negotiation pick it. Returns None when nothing needs to change.
    """
    _, offered = _audio_formats(remote_offer)
    offered_names = set(offered.values())
    best = next((n.split("/", 1)[0].upper() for n in priority if n.split("/", 1)[0].upper() in offered_names), None)
    if best is None:
        return None
    fmts, names = _audio_formats(local_sdp)
    keep = [pt for pt in fmts if names.get(pt) in (best, "TELEPHONE-EVENT")]
    if keep == fmts or not any(names.get(pt) == best for pt in keep):
        return None
    drop = set(fmts) - set(keep)
    out = []
    in_audio = False
    for line in local_sdp.splitlines():
        if line.startswith("m="):
            parts = line[2:].split()
            in_audio = bool(parts) and parts[0] == "audio" and parts[3:] == fmts
            if in_audio:
                line = "m=" + " ".join(parts[:3] + keep)
        elif in_audio and line.startswith(("a=rtpmap:", "a=fmtp:")):
            pt = line.split(":", 1)[1].split(" ", 1)[0]
            if pt in drop:
                continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"
