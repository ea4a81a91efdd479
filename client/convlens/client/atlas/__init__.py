"""The unit atlas: a static site (model, layer and unit pages, a search box) built entirely through the SDK.

    from convlens.client import Client
    from convlens.client.atlas import AtlasOptions, build_atlas

    with Client("localhost:50051", timeout=600) as client:
        build_atlas(client, "atlas/", AtlasOptions("efficientnet_lite0", channels=(0, 1, 2, 3)))

No torch, no server imports: an atlas is a client of the service (and a load test of it).
"""

from ._build import BuildReport, build_atlas
from ._manifest import NAME as MANIFEST_NAME
from ._plan import AtlasOptions, parse_channels

__all__ = ["MANIFEST_NAME", "AtlasOptions", "BuildReport", "build_atlas", "parse_channels"]
