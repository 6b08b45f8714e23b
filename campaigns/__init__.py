"""Outbound campaigns: a list of people to call, the rules for calling them (pace, windows, retries, a
do-not-call list), the answering-machine detector, and the campaign's own state on disk.

Everything here is pure or plain-file work, so it imports nothing of the SIP side or the app (only
callbot.engine.contract of the engine, by the import contracts): app/campaign_runner.py dials the calls
and feeds these parts what happens.
"""
