"""Answers `rpc.devices.verify` so other processes can authenticate devices."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from fleetmesh.core.backbone import Backbone
from fleetmesh.core.device_auth import (
    VERIFY_QUEUE,
    VERIFY_SUBJECT,
    VerifyReply,
    VerifyRequest,
)
from fleetmesh.core.logging import get_logger
from fleetmesh.devices.service import DeviceQueries

log = get_logger(__name__)


class VerifyResponder:
    """A queue-group subscriber: replicas of the devices service share the checks."""

    def __init__(self, backbone: Backbone, queries: DeviceQueries) -> None:
        self.backbone = backbone
        self.queries = queries
        self._subscription: Any = None

    async def start(self) -> None:
        self._subscription = await self.backbone.nc.subscribe(
            VERIFY_SUBJECT, queue=VERIFY_QUEUE, cb=self._answer
        )

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _answer(self, message: Any) -> None:
        try:
            request = msgspec.json.decode(message.data, type=VerifyRequest)
            reply = VerifyReply(await self.queries.verify_device(request.device_id, request.secret))
        except (msgspec.ValidationError, msgspec.DecodeError):
            reply = VerifyReply(False)
        except Exception as error:
            log.warning("device_verify_failed", error=repr(error))
            reply = VerifyReply(False, unavailable=True)
        await message.respond(msgspec.json.encode(reply))
