"""Speech analytics: what a finished call's stereo recording and live events say about it.

From the recording (caller left, bot right: no diarization needed), the call's events file and its
record, this package computes speech segments per leg, talk/overtalk/dead-air metrics, response latency
and barge-ins, transcripts with PII redacted, sentiment, and the categories and scores of a tenant's
rules. It runs off the hot path (its own process or pool) and imports of the engine only its contract.
"""
