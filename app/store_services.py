"""What serves the call store beside the calls: its JSON API (with the campaigns' routes) and the hourly
retention job. `callbot serve` starts them in its own process; `callbot serve --edge --workers N` starts
them once, in the supervisor (app/workers.py), so that N workers neither fight for one API port nor purge
the same calls N times. Kept apart from app/serve.py because the supervisor loads neither pjsua2 nor the
model, and serve's module imports the SIP endpoint."""
from __future__ import annotations

from callbot.app.errors import StartupError
from callbot.app.settings import Settings


def start_store_api(settings: Settings, campaigns=None):
    """The store's JSON HTTP API on [store] api, on a thread of its own (store/api.py), with the campaign
    routes of `campaigns` (app/campaign_api.py CampaignRegistry) when given."""
    from callbot.store.api import ApiServer
    from callbot.store.database import StoreError

    host, port = settings.store.api_address
    extra = ()
    if campaigns is not None:
        from callbot.app.campaign_api import routes

        extra = routes(campaigns)
    try:
        return ApiServer.start(settings.store_url(), host, port, routes=extra)
    except (OSError, StoreError) as err:
        raise StartupError(f"[store] api {settings.store.api!r}: {err}") from None


def start_campaigns(settings: Settings):
    """The campaign registry of the store's API (<recordings_dir>/campaigns): a dialer runs with [campaigns]
    dialer_config, or the config a request names (never the server's own: it holds the SIP port)."""
    import os

    from callbot.app.campaign_api import CampaignRegistry

    return CampaignRegistry(os.path.join(settings.recordings_dir, "campaigns"), settings.campaigns.dialer_config,
                            config_required=True, engine=settings.campaigns.engine)


def start_retention(settings: Settings):
    """The hourly purge of calls past their period (store/retention.py RetentionJob, started), or None when
    neither [retention] days nor a tenant's retention_days sets one."""
    by_tenant = settings.retention_by_tenant()
    if not (settings.retention.days > 0 or any(by_tenant.values())):
        return None
    from callbot.store.retention import RetentionJob

    return RetentionJob(settings.recording_dirs(), settings.store_url() if settings.store.enabled else None,
                        settings.retention.days, tenants=by_tenant).start()
