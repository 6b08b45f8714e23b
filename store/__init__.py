"""The call store: every call, its legs, events, flow course, transcripts, metrics, categories and
scores in one database schema, SQLite by default (WAL, beside the recordings) or PostgreSQL for scale.

Written as the call goes and finalized at hang-up, so a crash mid-call leaves the call marked
incomplete with what was known. It imports of the engine only its contract.
"""
