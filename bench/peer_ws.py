"""The Twilio side of the WebSocket baseline: a process that connects to a Media Streams-style server,
sends the same click train as bench/peer_audio.py as JSON `media` messages (base64 mu-law, 8 kHz,
20 ms each) on an absolute 20 ms schedule, and timestamps every message it gets back.

Why a process of its own: the SIP peer is one too, so neither side of the comparison shares a GIL
with the server it measures.

    python bench/peer_ws.py --url ws://127.0.0.1:PORT --clicks 100 --out result.npz

The result has the fields of peer_audio.py's: `sent`, `heard`, `t_req` (send time per message),
`t_rcv` (arrival time per message back), `rate` 8000, `frame` 160, `jbuf` zeros (no jitter buffer).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import pathlib
import sys
import time

import numpy as np
import uvloop
import websockets

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import mulaw  # noqa: E402
from peer_audio import WARMUP_S, click  # noqa: E402

RATE, FRAME = 8000, 160
STREAM_SID = "MZbench0000000000000000000000000000"


async def run(args) -> dict:
    total_frames = int((WARMUP_S + args.clicks * args.interval_ms / 1000 + 1.0) * 50)
    signal = np.zeros(total_frames * FRAME, np.int16)
    burst = click(RATE)
    sent = np.array([int(WARMUP_S * RATE) + int(round(i * args.interval_ms / 1000 * RATE))
                     for i in range(args.clicks)], np.int64)
    for s in sent:
        signal[s:s + len(burst)] = burst
    t_req = np.zeros(total_frames, np.int64)
    t_rcv = np.zeros(total_frames + 64, np.int64)
    heard = bytearray()
    received = 0
    async with websockets.connect(args.url, max_queue=None, compression=None) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": STREAM_SID,
                                  "start": {"streamSid": STREAM_SID, "tracks": ["inbound"],
                                            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE,
                                                            "channels": 1}}}))

        async def receive():
            nonlocal received
            async for msg in ws:
                now = time.monotonic_ns()
                m = json.loads(msg)
                if m.get("event") != "media":
                    continue
                pcm = mulaw.decode(base64.b64decode(m["media"]["payload"]))
                # one timestamp per 20 ms of audio, as the SIP peer has one per frame it is handed
                for i in range(0, len(pcm), FRAME):
                    if received < len(t_rcv):
                        t_rcv[received] = now
                        received += 1
                heard.extend(pcm.tobytes())
                if received >= total_frames:
                    return

        receiver = asyncio.ensure_future(receive())
        start = time.monotonic_ns()
        for k in range(total_frames):
            # absolute schedule: a late wake does not shift the frames after it
            delay = (start + k * 20_000_000 - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = signal[k * FRAME:(k + 1) * FRAME]
            t_req[k] = time.monotonic_ns()
            await ws.send(json.dumps({"event": "media", "sequenceNumber": str(k + 2), "streamSid": STREAM_SID,
                                      "media": {"track": "inbound", "chunk": str(k + 1),
                                                "timestamp": str(k * 20),
                                                "payload": base64.b64encode(mulaw.encode(chunk)).decode()}}))
        try:
            await asyncio.wait_for(receiver, 5.0)
        except asyncio.TimeoutError:
            pass
        await ws.send(json.dumps({"event": "stop", "streamSid": STREAM_SID}))
    np.savez(args.out, sent=sent, heard=np.frombuffer(bytes(heard), np.int16), t_req=t_req,
             t_rcv=t_rcv[:received], rate=RATE, frame=FRAME, jbuf=np.zeros(4))
    return {"ev": "done", "frames_back": received}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--clicks", type=int, default=100)
    p.add_argument("--interval-ms", type=float, default=217.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
