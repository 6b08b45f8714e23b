"""The panel's campaigns page over the campaign registry (web/campaigns.py CampaignDesk over
app/campaign_api.py CampaignRegistry): the registry's campaigns with their tenant (their bot's, from the
config) and its errors as the panel's. The panel only reads and controls: its registry starts nothing, so
it works beside the HTTP API's (the same folder, the dialers controlled through their control files)."""
from __future__ import annotations

import os
from typing import Any

from callbot.app.campaign_api import CampaignApiError, CampaignRegistry
from callbot.app.settings import Settings
from callbot.web.campaigns import CampaignDeskError


class PanelCampaigns:
    def __init__(self, registry: CampaignRegistry, tenant_of_bot: dict[str, str | None]):
        self.registry = registry
        self.tenant_of_bot = tenant_of_bot

    @classmethod
    def of(cls, settings: Settings, registry: CampaignRegistry | None = None) -> PanelCampaigns:
        """The campaigns under the recordings folder (<recordings_dir>/campaigns), tenants from the bots;
        `registry`: serve's HTTP API's, when it has one (it started the dialers: their exit status is its)."""
        if registry is None:
            registry = CampaignRegistry(os.path.join(settings.recordings_dir, "campaigns"), None,
                                        config_required=True)
        return cls(registry, {b.name: b.tenant for b in settings.bots})

    def all(self) -> list[dict[str, Any]]:
        """A campaign's tenant is its bot's; one started without a bot (its dialer's first bot, in a config
        the panel may not know) has none: only users of every tenant see it."""
        return [{**c, "tenant": self.tenant_of_bot.get(c["bot"]) if c.get("bot") else None}
                for c in self.registry.all()]

    def control(self, cid: str, action: str) -> dict[str, Any]:
        try:
            return self.registry.control(cid, action)
        except CampaignApiError as err:
            raise CampaignDeskError(str(err), err.status) from None
