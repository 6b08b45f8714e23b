"""The panel's campaigns page over the campaign registry (web/campaigns.py CampaignDesk over
app/campaign_api.py CampaignRegistry): the registry's campaigns with their tenant (their bot's, from the
config), its starts and controls, and its errors as the panel's. With the store's HTTP API in the same
process the panel shares its registry; alone it has its own over the same folder (the dialers are
controlled through their control files, whoever started them), and stops the dialers it started."""
from __future__ import annotations

import os
from typing import Any

from callbot.app.campaign_api import CampaignApiError, CampaignRegistry
from callbot.app.settings import Settings
from callbot.web.campaigns import CampaignDeskError


class PanelCampaigns:
    def __init__(self, registry: CampaignRegistry, tenant_of_bot: dict[str, str | None], owned: bool = True):
        self.registry = registry
        self.tenant_of_bot = tenant_of_bot
        self.owned = owned  # this panel's own registry: its dialers stop with it (`close`), as the API's do

    @classmethod
    def of(cls, settings: Settings, registry: CampaignRegistry | None = None,
           config: str | None = None) -> PanelCampaigns:
        """The campaigns under the recordings folder (<recordings_dir>/campaigns), tenants from the bots;
        `registry`: serve's HTTP API's, when it has one (it started the dialers: their exit status is its).
        A campaign started from the panel dials with [campaigns] dialer_config, else `config` (`callbot web
        --config`: a process that holds no SIP port; serve passes none: its own config would clash)."""
        if registry is not None:
            return cls(registry, {b.name: b.tenant for b in settings.bots}, owned=False)
        registry = CampaignRegistry(os.path.join(settings.recordings_dir, "campaigns"),
                                    settings.campaigns.dialer_config or config, config_required=True,
                                    engine=settings.campaigns.engine)
        return cls(registry, {b.name: b.tenant for b in settings.bots})

    def bots(self) -> list[tuple[str, str | None]]:
        return sorted(self.tenant_of_bot.items())

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.registry.start(body)
        except CampaignApiError as err:
            raise CampaignDeskError(str(err), err.status) from None

    def close(self) -> None:
        """Stops the dialers this panel started (started again, each resumes where it stopped)."""
        if self.owned:
            self.registry.close()

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
