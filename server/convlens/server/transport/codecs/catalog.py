"""ListModels / GetModel messages."""

from __future__ import annotations

from convlens.server.models.model import LayerSpec, ReceptiveField, ServedModel
from convlens.v1 import convlens_pb2 as pb


def model_info(model: ServedModel) -> pb.ModelInfo:
    pre = model.preprocess
    return pb.ModelInfo(
        name=model.name, format=model.format, input_height=pre.height, input_width=pre.width,
        num_classes=model.num_classes, resize=pre.resize, mean=list(pre.mean), std=list(pre.std),
        supports_gradients=model.supports_gradients, parameter_count=model.parameter_count,
        description=model.description, version=model.version)


def receptive_field(rf: ReceptiveField | None) -> pb.ReceptiveField | None:
    if rf is None:
        return None
    return pb.ReceptiveField(size_y=rf.size_y, size_x=rf.size_x, jump_y=rf.jump_y, jump_x=rf.jump_x,
                             offset_y=rf.offset_y, offset_x=rf.offset_x)


def layer_info(spec: LayerSpec) -> pb.LayerInfo:
    return pb.LayerInfo(name=spec.name, type=spec.type, output_shape=list(spec.output_shape),
                        parameter_count=spec.parameter_count, receptive_field=receptive_field(spec.receptive_field),
                        has_filters=spec.has_filters)


def list_models_response(models: list[ServedModel]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_info(m) for m in models])


def get_model_response(model: ServedModel) -> pb.GetModelResponse:
    return pb.GetModelResponse(model=model_info(model), layers=[layer_info(s) for s in model.layers],
                               labels=model.labels)
