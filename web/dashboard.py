"""The dashboard's numbers for the calls a filter takes: counts per hour and by outcome, answered /
transferred / abandoned, containment, average handle time, the bot's response latency, overtalk and
barge-ins, category hits, scorecards' mean scores, the caller's sentiment by day. Counted by the database (a few aggregate queries), so the page costs the
same with ten calls as with ten thousand.

Definitions (docs/web.md): answered = the call has an answer time; abandoned = not answered (outcome
`unanswered`); containment = answered calls the bot kept (not transferred) over answered calls; AHT =
mean of answered calls' duration (answer to end). Latency: the analysis keeps each call's response
latency p50 and p99; the dashboard shows the median of the calls' p50 and the 99th percentile of the
calls' p99 (the per-turn lists stay in each analysis run).
"""
from __future__ import annotations

from sqlalchemy import Connection, func, select

from callbot.store import queries
from callbot.store.queries import CallFilter
from callbot.store.schema import calls, category_hits, metrics, scores


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    i = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[i]


def dashboard(conn: Connection, f: CallFilter) -> dict:
    f = CallFilter(**{**{k: getattr(f, k) for k in f.__struct_fields__}, "limit": None, "offset": 0})
    stats = queries.stats(conn, f)
    taken = select(calls.c.call_id).where(*queries.conditions(f)).scalar_subquery()  # the filter's calls
    answered, aht = conn.execute(select(func.count(calls.c.answered_at), func.avg(calls.c.duration_s))
                                 .where(calls.c.call_id.in_(taken), calls.c.answered_at.is_not(None))).one()
    transferred = stats["by_outcome"].get("transferred", 0)
    abandoned = stats["by_outcome"].get("unanswered", 0)
    per_metric: dict[str, list[float]] = {}
    for name, value in conn.execute(select(metrics.c.name, metrics.c.value).where(
            metrics.c.call_id.in_(taken), metrics.c.leg == "call",
            metrics.c.name.in_(("response_latency_p50_ms", "response_latency_p99_ms")))):
        per_metric.setdefault(name, []).append(value)
    sums = dict(conn.execute(select(metrics.c.name, func.sum(metrics.c.value)).where(
        metrics.c.call_id.in_(taken), metrics.c.leg == "call",
        metrics.c.name.in_(("overtalk_count", "barge_ins", "overtalk_ms", "dead_air_count")))
        .group_by(metrics.c.name)).all())
    analysed = conn.execute(select(func.count(func.distinct(metrics.c.call_id)))
                            .where(metrics.c.call_id.in_(taken))).scalar_one()
    hits = [{"category": c, "calls": n} for c, n in conn.execute(
        select(category_hits.c.category, func.count()).where(category_hits.c.call_id.in_(taken),
                                                             category_hits.c.matched.is_(True))
        .group_by(category_hits.c.category).order_by(func.count().desc(), category_hits.c.category))]
    cards = [{"scorecard": name, "mean": mean, "max": top, "calls": n} for name, mean, top, n in conn.execute(
        select(scores.c.scorecard, func.avg(scores.c.score), func.max(scores.c.max_score), func.count())
        .where(scores.c.call_id.in_(taken)).group_by(scores.c.scorecard).order_by(scores.c.scorecard))]
    # the caller's mean sentiment per day (UTC): days, not hours, so that a day's few calls make a point
    by_day: dict[int, list[float]] = {}
    for start, value in conn.execute(select(calls.c.start_at, metrics.c.value).join(
            metrics, metrics.c.call_id == calls.c.call_id).where(
            calls.c.call_id.in_(taken), metrics.c.leg == "caller", metrics.c.name == "sentiment",
            calls.c.start_at.is_not(None))):
        by_day.setdefault(int(start // 86400) * 86400, []).append(value)
    sentiment = [{"day": (queries.iso(d) or "")[:10], "sentiment": sum(v) / len(v), "calls": len(v)}
                 for d, v in sorted(by_day.items())]
    return {
        "scores": cards,
        "sentiment_by_day": sentiment,
        "calls": stats["calls"],
        "per_hour": stats["per_hour"],
        "by_outcome": stats["by_outcome"],
        "by_bot": stats["by_bot"],
        "answered": answered,
        "transferred": transferred,
        "abandoned": abandoned,
        "containment": (answered - transferred) / answered if answered else None,
        "aht_s": aht,
        "latency_p50_ms": _percentile(per_metric.get("response_latency_p50_ms", []), 0.5),
        "latency_p99_ms": _percentile(per_metric.get("response_latency_p99_ms", []), 0.99),
        "overtalk_count": int(sums.get("overtalk_count", 0)),
        "overtalk_s": sums.get("overtalk_ms", 0.0) / 1000.0,
        "barge_ins": int(sums.get("barge_ins", 0)),
        "analysed": analysed,
        "categories": hits,
    }
