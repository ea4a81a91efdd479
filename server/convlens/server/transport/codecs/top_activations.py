"""TopActivations and ListDatasets messages."""

from __future__ import annotations

import io

from PIL import Image

from convlens.server.errors import InvalidArgument
from convlens.server.service import top_activations as service
from convlens.server.service.top_activations import (
    OUTPUTS,
    Box,
    DatasetSummary,
    TopActivationsAnswer,
    TopActivationsQuery,
    TopItem,
)
from convlens.server.transport.codecs.common import enum, geometry, given, image_input, outputs
from convlens.server.transport.codecs.vocabulary import enum_names, enum_values
from convlens.v1 import convlens_pb2 as pb

RANKINGS = enum_names(pb.Ranking, service.RANKINGS, unspecified="max")
TOP_OUTPUTS = enum_names(pb.TopActivationsOutput, OUTPUTS, unspecified=None)
STATES = enum_values(enum_names(pb.IndexState, service.STATES, unspecified=None))  # "ready" -> INDEX_STATE_READY


def query(request: pb.TopActivationsRequest) -> TopActivationsQuery:
    images = []
    for i, message in enumerate(request.images):
        image = image_input(message, f"images[{i}]")
        if image is None:
            raise InvalidArgument(f"images[{i}] is empty: set encoded bytes or a tensor", field=f"images[{i}]")
        images.append(image)
    return TopActivationsQuery(
        model=request.model, layer=request.layer, channel=request.channel, k=given(request, "k", 9),
        dataset=request.dataset, ranking=enum(RANKINGS, request.ranking, "ranking", "Ranking"),
        max_per_image=given(request, "max_per_image", 1), images=images, crops=request.include_crops,
        pictures=request.include_images,
        outputs=outputs(TOP_OUTPUTS, request.outputs, pb.TopActivationsOutput))


def png(image: Image.Image | None) -> bytes:
    """Fast PNG (zlib level 1): photos barely compress, and level 6 took ~100 ms per 512-px crop."""
    if image is None:
        return b""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _box(b: Box) -> pb.Box:
    return pb.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3])


def _item(t: TopItem) -> pb.TopActivation:
    return pb.TopActivation(
        image_index=t.image_index, source=t.source, digest=t.digest, score=t.score, y=t.y, x=t.x,
        box=_box(t.box), original_box=_box(t.original_box), geometry=geometry(t.geometry),
        crop_png=png(t.crop), image_png=png(t.picture), photo_png=png(t.photo))


def response(answer: TopActivationsAnswer) -> pb.TopActivationsResponse:
    s = answer.stats
    stats = (pb.ChannelStats(images=s.images, mean=s.mean, max=s.max, positive_fraction=s.positive_fraction)
             if "stats" in answer.outputs else None)
    return pb.TopActivationsResponse(
        activations=[_item(t) for t in answer.items], images_scanned=answer.images_scanned, stats=stats,
        channels=answer.channels, dataset=answer.dataset)


def datasets_response(summaries: list[DatasetSummary]) -> pb.ListDatasetsResponse:
    return pb.ListDatasetsResponse(datasets=[
        pb.DatasetInfo(name=d.name, description=d.description, image_count=d.image_count,
                       skipped_count=d.skipped_count, digest=d.digest,
                       indexes=[pb.IndexInfo(model=m, layer=layer, state=STATES[state], images_done=done,
                                             images_total=total) for m, layer, state, done, total in d.indexes])
        for d in summaries])
