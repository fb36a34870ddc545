"""The announcement's states as ``/v1/status`` shows them, in virtual time: a
reload of ``api.advertise`` applies at once, not at the next address refresh.
(Announcing for real, across a link: tests/integration/test_discovery.py.)"""

from __future__ import annotations

import msgspec
import trio
import trio.testing

from edge_agent.config import ApiConfig
from edge_agent.discovery import REFRESH_SECONDS, Advertiser


async def test_a_reload_turns_the_announcement_on_and_off_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    off = ApiConfig(enabled=True, listen="0.0.0.0:8640", token_file="/t", advertise=False)
    # The API is not serving yet, so turning it on waits for it (no network touched).
    advertiser = Advertiser(off, device_id="mic", api_url=lambda: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(advertiser.run)
        await trio.testing.wait_all_tasks_blocked()
        assert (advertiser.stats.state, advertiser.stats.detail) == (
            "off", "api.advertise = false")
        await trio.sleep(REFRESH_SECONDS / 2)
        reloaded_at = trio.current_time()
        advertiser.reconfigure(msgspec.structs.replace(off, advertise=True))
        await trio.testing.wait_all_tasks_blocked()
        assert (advertiser.stats.state, advertiser.stats.detail) == (
            "waiting", "the API is not serving")
        assert trio.current_time() == reloaded_at  # at once, not at the next refresh
        nursery.cancel_scope.cancel()
    assert (advertiser.stats.registrations, advertiser.stats.failures) == (0, 0)
