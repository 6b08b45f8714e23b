"""Call flows: declarative state machines (TOML) that steer a call through the call-control contract.

A flow file names states (play a prompt, gather digits, converse with a persona, call a webhook,
transfer, hang up); a runner per call moves between them on the call's live events. This package
imports of the engine only its contract (callbot.engine.contract) and nothing of the SIP side: the
app feeds it events and gives it a call to act on.
"""
