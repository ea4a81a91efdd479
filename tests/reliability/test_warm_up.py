"""Start-up warm-up (issue #15, the slow first calls): every lane's replica of every served model is made and
run once before the port opens, so a first call finds it ready; `--no-warm-up` leaves it to the first calls."""

from __future__ import annotations

import numpy as np
import pytest

from convlens.client import AsyncClient
from convlens.server.app import ConvLensServer
from convlens.server.config import ServerConfig, from_args
from convlens.server.models.repository import ModelRepository
from tests.streaming.conftest import MODEL, photo, tiny_model


def expected_lanes(config: ServerConfig) -> set[str]:
    shards = config.policy_for("cpu").shards
    return {"cpu/device"} if shards == 1 else {f"cpu/shard{i}" for i in range(shards)}


@pytest.mark.parametrize("warm", [True, False])
async def test_replicas_are_made_before_the_port_opens_and_used_by_the_first_call(warm: bool) -> None:
    model = tiny_model()
    config = ServerConfig(host="127.0.0.1", port=0, metrics=False, embedded=False, device="cpu",
                          grace_seconds=0.0, warm_up=warm)
    srv = ConvLensServer(config, repository=ModelRepository([model]))
    await srv.start()
    try:
        warmed = dict(model.lane_replicas)
        assert set(warmed) == (expected_lanes(config) if warm else set())
        async with AsyncClient(f"127.0.0.1:{srv.port}", timeout=60) as client:
            first = [await client.saliency(photo(32, 32, seed), MODEL, target=1) for seed in (0, 1)]
    finally:
        await srv.stop(0.0)
    for lane, replica in warmed.items():
        assert model.lane_replicas[lane] is replica  # the first calls ran on the warmed replicas, not new ones
    assert all(np.isfinite(r.attribution).all() for r in first)


def test_the_flag_turns_it_off() -> None:
    assert from_args([]).warm_up and not from_args(["--no-warm-up"]).warm_up
