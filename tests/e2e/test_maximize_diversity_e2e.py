"""MaximizeUnit with several images per job and Lucid's diversity objective, through the real server, the
SDK and the CLI: every image comes back with its own objective and predictions, the settings echo the
knobs, and bad combinations are refused naming their field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convlens.client import Client, Unit
from convlens.client import _exceptions as exc
from convlens.client._cli import main as cli
from convlens.server.launcher import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "efficientnet_lite0"
UNIT = Unit("_blocks.3", 5)
SMALL = {"size": 64, "steps": 4, "timeout": 120}


def test_several_images_with_diversity(client: Client) -> None:
    r = client.maximize_unit(MODEL, UNIT, images=3, diversity=2.0, seed=4, **SMALL)
    assert len(r.images) == 3 and all(i.image.size == (64, 64) and len(i.predictions) == 5 for i in r.images)
    assert r.images[0].objective == pytest.approx(r.objective)
    assert np.array_equal(np.asarray(r.images[0].image), np.asarray(r.image))
    assert not np.array_equal(np.asarray(r.images[0].image), np.asarray(r.images[1].image))
    assert r.settings is not None
    assert (r.settings["images"], r.settings["diversity"], r.settings["diversity_layer"]) == (3, 2.0, "_blocks.3")
    assert 0.0 < r.gram_similarity <= 1.0
    single = client.maximize_unit(MODEL, UNIT, seed=4, **SMALL)
    assert single.images == [] and single.gram_similarity == 0.0 and single.settings["images"] == 1


@pytest.mark.parametrize(("target", "options", "field"), [
    (UNIT, {"diversity": 1.0}, "images"),  # diversity needs two images
    (UNIT, {"images": 17}, "images"),
    (UNIT, {"images": 2, "diversity": -1.0}, "diversity"),
    (1, {"images": 2, "diversity": 1.0}, "diversity_layer"),  # a class has no layer of its own
    (UNIT, {"images": 2, "diversity_layer": "_fc"}, "diversity_layer"),  # a vector, no Gram matrix
])
def test_bad_combinations_name_their_field(client: Client, target, options, field) -> None:
    with pytest.raises(exc.InvalidArgumentError) as info:
        client.maximize_unit(MODEL, target, **SMALL, **options)
    assert field in [v.field for v in info.value.field_violations], info.value


def test_unknown_diversity_layer_is_not_found(client: Client) -> None:
    with pytest.raises(exc.NotFoundError, match="nope"):
        client.maximize_unit(MODEL, UNIT, images=2, diversity_layer="nope", **SMALL)


def test_cli_writes_each_image(server: ServerProcess, tmp_path: Path, capsys) -> None:
    out = tmp_path / "unit.png"
    rc = cli(["--server", server.address, "maximize", MODEL, "--unit", "_blocks.3:5", "--images", "2",
              "--diversity", "1", "--steps", "3", "--size", "64", "--quiet", "-o", str(out)])
    assert rc == 0
    assert (tmp_path / "unit-1.png").stat().st_size > 0 and (tmp_path / "unit-2.png").stat().st_size > 0
    assert "2 images, mean pairwise Gram similarity" in capsys.readouterr().out
