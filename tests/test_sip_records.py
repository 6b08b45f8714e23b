"""An endpoint keeps a bounded history of call records: a long-running server must not grow with every INVITE."""
from callbot.sip import endpoint as endpoint_module
from callbot.sip.call_record import CallRecord
from callbot.sip.endpoint import Endpoint


def test_records_keep_only_the_newest(monkeypatch):
    monkeypatch.setattr(endpoint_module, "RECORDS_KEPT", 2)
    ep = Endpoint()  # not started: no pjsua2 object exists
    for i in range(3):
        ep._keep_record(CallRecord(call_id=f"c{i}", direction="inbound", account="a", local_uri="sip:a@h",
                                   remote_uri="sip:b@h", start=float(i)))
    assert list(ep.records) == ["c1", "c2"]
