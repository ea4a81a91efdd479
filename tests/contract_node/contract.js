// ConvLens's contract, called from Node.js with a client built from proto/ alone (@grpc/grpc-js +
// @grpc/proto-loader): every RPC of InspectionService, the three streams, and rich errors with their
// google.rpc details decoded. Prints one JSON object; test_node_contract.py starts the server, runs
// this and checks the JSON. What it loads from outside proto/ (googleapis' google/rpc protos) and why
// protobufjs is a dependency of its own: README.md.
//
// usage: node contract.js HOST:PORT MODEL LAYER PROTO_DIR GOOGLE_PROTO_DIR
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, model, layer, protoDir, googleDir] = process.argv.slice(2);
const LOAD = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

const contract = grpc.loadPackageDefinition(protoLoader.loadSync(
  path.join(protoDir, 'convlens/v1/convlens.proto'), { ...LOAD, includeDirs: [protoDir] })).convlens.v1;
// google.rpc.Status and its details (googleapis' own .proto files), to decode grpc-status-details-bin.
const protobuf = require('protobufjs');
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (origin, target_) => path.join(googleDir, target_);
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });

const client = new contract.InspectionService(target, grpc.credentials.createInsecure());
const repository = new contract.ModelRepositoryService(target, grpc.credentials.createInsecure());

// An RGB image (40x48 unless asked) as a raw uint8 tensor: shapes are int64, sent here as strings (see the .proto header).
function image(seed, h = 40, w = 48) {
  const data = Buffer.alloc(h * w * 3);
  for (let i = 0; i < data.length; i++) data[i] = (i * 37 + seed * 101) % 256;
  return { tensor: { dtype: 'DTYPE_UINT8', shape: [String(h), String(w), '3'], data } };
}

function unary(method, request, metadata, service) {
  return new Promise((resolve) => {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(metadata || {})) md.set(k, v);
    let answer = null;
    const stub = service === 'repository' ? repository : client;
    const call = stub[method](request, md, (err, response) => {
      answer = err ? { error: decodeError(err) } : { response };
    });
    // the status (with the trailing metadata) comes after the callback
    call.on('status', (s) => setImmediate(() => resolve({ ...answer, trailers: s.metadata.getMap() })));
  });
}

function stream(method, request) {
  return new Promise((resolve) => {
    const events = [];
    const call = client[method](request);
    call.on('data', (e) => events.push(e));
    call.on('error', (err) => resolve({ events, error: decodeError(err) }));
    call.on('end', () => resolve({ events }));
  });
}

// The rich error: the status details trailer decoded into BadRequest violations and the ErrorInfo.
function decodeError(err) {
  const out = { code: grpc.status[err.code], message: err.details, violations: [], reason: null, domain: null };
  const blobs = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (blobs.length) {
    const status = rpcTypes.lookupType('google.rpc.Status').decode(blobs[0]);
    for (const any of status.details) {
      const name = any.type_url.split('/').pop();
      const detail = rpcTypes.lookupType(name).decode(any.value);
      if (name === 'google.rpc.BadRequest') {
        for (const v of detail.field_violations) out.violations.push({ field: v.field, description: v.description });
      } else if (name === 'google.rpc.ErrorInfo') {
        out.reason = detail.reason;
        out.domain = detail.domain;
      }
    }
  }
  const rid = err.metadata ? err.metadata.get('x-request-id') : [];
  out.request_id = rid.length ? String(rid[0]) : null;
  return out;
}

function summary(result, pick) {
  if (result.error) return { error: result.error };
  return pick(result.response);
}

function streamSummary(result) {
  const progress = result.events.filter((e) => e.event === 'progress').map((e) => e.progress);
  const results = result.events.filter((e) => e.event === 'result').map((e) => e.result);
  return {
    error: result.error || null,
    progress_steps: progress.map((p) => p.step),
    objective_keys: [...new Set(progress.flatMap((p) => Object.keys(p.objectives)))].sort(),
    octaves: progress.map((p) => (p.octave === undefined || p.octave === null ? null : p.octave)),
    results: results.length,
    image_png_bytes: results.length ? results[0].image_png.length : 0,
    settings: results.length ? results[0].settings : null,
  };
}

async function main() {
  const out = {};
  out.ListModels = summary(await unary('ListModels', {}, { 'x-request-id': 'node-contract-1' }),
    (r) => ({ models: r.models.map((m) => m.name) }));
  const listed = await unary('ListModels', {}, { 'x-request-id': 'node-contract-1' });
  out.request_id_echo = listed.trailers ? String(listed.trailers['x-request-id']) : null;
  out.GetModel = summary(await unary('GetModel', { model }), (r) => ({
    name: r.model.name,
    layers: r.layers.length,
    shape_of_layer: (r.layers.find((l) => l.name === layer) || {}).output_shape,
    parameter_count_type: typeof r.model.parameter_count,
  }));
  const firstConv = await unary('GetModel', { model });
  const convLayer = firstConv.response.layers.find((l) => l.has_filters).name;
  out.GetFilters = summary(await unary('GetFilters', { model, layer: convLayer, render_grid: true }), (r) => ({
    dtype: r.weights.dtype, shape: r.weights.shape, grid_png_bytes: r.grid_png.length,
  }));
  out.ListDatasets = summary(await unary('ListDatasets', {}), (r) => ({
    datasets: r.datasets.map((d) => ({ name: d.name, image_count: d.image_count })),
  }));
  out.TopActivations = summary(await unary('TopActivations', {
    model, layer, channel: 1, k: 2, images: [image(1), image(2), image(3)],
  }), (r) => ({ sources: r.activations.map((a) => a.source), channels: r.channels }));
  out.Saliency = summary(await unary('Saliency', {
    model, image: image(4), method: 'SALIENCY_METHOD_SMOOTHGRAD', smoothgrad: { samples: 2, noise_level: 0 },
  }), (r) => ({ heatmap_shape: r.heatmap.shape, predictions: r.predictions.length, notes: r.notes }));
  out.MaximizeUnit = streamSummary(await stream('MaximizeUnit', {
    model, target: { unit: { layer, channel: 0 } }, steps: 3, size: 32, seed: '0', preset: 'MAXIMIZE_PRESET_LECTURE',
  }));
  // Dream with seed 0 set explicitly (honoured: reported 0) and jitter 0 (valid: no roll).
  out.Dream = streamSummary(await stream('Dream', {
    model, image: image(5, 64, 64), layer, octaves: 2, steps_per_octave: 2, max_size: 64, seed: '0', jitter: 0,
  }));
  // Dream with the seed left unset: a random one, reported.
  out.DreamUnsetSeed = streamSummary(await stream('Dream', {
    model, image: image(5), layer, octaves: 1, steps_per_octave: 1, max_size: 48,
  }));
  out.StyleTransfer = streamSummary(await stream('StyleTransfer', {
    model, content: image(6), style: image(7), steps: 2, size: 32, seed: '3',
  }));
  // Rich errors: two bad fields (explicit zeros where zero is not valid) -> two violations + ErrorInfo.
  out.DreamTwoBadFields = streamSummary(await stream('Dream', {
    model, image: image(5), layer, steps_per_octave: 0, max_size: 0,
  }));
  out.StyleTwoBadFields = streamSummary(await stream('StyleTransfer', { model, steps: 0, size: 0 }));
  out.SaliencyTwoBadFields = summary(await unary('Saliency', {
    model, image: image(4), method: 'SALIENCY_METHOD_SMOOTHGRAD', smoothgrad: { samples: 0 },
    target: { class_index: 99 },
  }), () => ({}));
  // ModelRepositoryService: the index, and load/unload refused on a server without model control.
  out.RepositoryIndex = summary(await unary('RepositoryIndex', {}, {}, 'repository'),
    (r) => ({ names: r.models.map((m) => m.name), states: r.models.map((m) => m.state) }));
  out.LoadModel = summary(await unary('LoadModel', { model: 'x' }, {}, 'repository'), () => ({}));
  out.UnloadModel = summary(await unary('UnloadModel', { model: model }, {}, 'repository'), () => ({}));
  out.UnknownModel = summary(await unary('GetModel', { model: 'no-such-model' }, { 'x-request-id': 'node-err-2' }),
    () => ({}));
  client.close();
  repository.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((e) => { process.stderr.write(String(e && e.stack || e) + '\n'); process.exit(1); });
