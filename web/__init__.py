"""The web panel: the call store seen by people who run a contact center (issue 16), server-rendered.

Starlette with Jinja2 templates, every script, stylesheet and chart served from this package (no Node
build, no CDN: the panel works on a machine with no internet). Users with roles and a tenant scope live
in the call store (web/users.py); pages read the store through callbot.store.queries, so the panel, the
command line and the JSON API see the same calls. It imports of the engine only its contract and
nothing of the SIP side (pyproject.toml's import contracts): `callbot serve` hands it the store's URL.
"""
