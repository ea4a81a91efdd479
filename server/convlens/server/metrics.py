"""Every Prometheus metric the server exports, in one registry (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """One instance per server (tests build their own, so registries never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # gRPC server metrics, named as go-grpc-prometheus / py-grpc-prometheus name them, plus `protocol`:
        # grpc, or http for the same RPCs called through the HTTP/JSON front (transport/http/).
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.",
                               ["grpc_type", "grpc_service", "grpc_method", "protocol"], registry=r)
        self.handled = Counter("grpc_server_handled_total", "RPCs completed on the server, by status code.",
                               ["grpc_type", "grpc_service", "grpc_method", "grpc_code", "protocol"], registry=r)
        self.handling_seconds = Histogram("grpc_server_handling_seconds",
                                          "Time from RPC start to its last response.",
                                          ["grpc_type", "grpc_service", "grpc_method", "protocol"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.model_loaded = Gauge("convlens_model_loaded", "1 for each model the server serves.",
                                  ["model", "format"], registry=r)
        self.model_load_failures = Counter("convlens_model_load_failures_total",
                                           "Model folders that failed to load at start-up.",
                                           ["model"], registry=r)
        # Scheduler and workers.
        self.queue_depth = Gauge("convlens_scheduler_queue_depth", "Tasks waiting for a batch.",
                                 ["device"], registry=r)
        self.batch_size = Histogram("convlens_scheduler_batch_size",
                                    "Tasks per computed batch (on a CPU with shards: per shard's part).",
                                    ["device", "model", "rpc"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("convlens_scheduler_queue_wait_seconds",
                                            "Time a task waited from submission to the start of its batch.",
                                            ["model", "rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("convlens_scheduler_compute_seconds",
                                         "Time a batch spent computing on its worker (or shard).",
                                         ["device", "model", "rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("convlens_scheduler_rejections_total",
                                  "Tasks refused or dropped before compute, by reason.",
                                  ["model", "rpc", "reason"], registry=r)
        self.tasks = Counter("convlens_scheduler_tasks_total", "Tasks computed.",
                             ["device", "model", "rpc"], registry=r)
        self.worker_busy_seconds = Counter("convlens_worker_busy_seconds_total",
                                           "Seconds each compute lane of a device worker spent computing: lane "
                                           "'device' (every thread; the only lane on a GPU) or 'shardN' (a CPU "
                                           "shard); each lane at most its wall time.",
                                           ["device", "lane"], registry=r)
        # A lane's thread that ended (scheduler/shards.py LaneDied): its callers got UNAVAILABLE and a fresh
        # thread with fresh replicas took its place (issue #15).
        self.lane_restarts = Counter("convlens_worker_lane_restarts_total",
                                     "Compute lanes whose thread died and was replaced by a fresh one.",
                                     ["device", "lane"], registry=r)
        # Optimisation jobs (MaximizeUnit, Dream, StyleTransfer), stepped by the step scheduler.
        self.active_jobs = Gauge("convlens_active_jobs", "Optimisation jobs admitted and not yet finished.",
                                 ["rpc"], registry=r)
        self.steps = Counter("convlens_optimization_steps_total",
                             "Optimisation steps computed (rate() of it: steps per second).",
                             ["model", "rpc"], registry=r)
        self.step_batch_size = Histogram("convlens_step_batch_size",
                                         "Jobs sharing one forward/backward of an optimisation step (on a CPU "
                                         "with shards: one shard's part of the batch).",
                                         ["model", "rpc"], buckets=BATCH_BUCKETS, registry=r)
        self.first_progress_seconds = Histogram("convlens_time_to_first_progress_seconds",
                                                "Time from admitting a job to its first step's progress event.",
                                                ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        # A stream reader that stopped reading pauses its job (scheduler/steps.py, CALLER_PATIENCE).
        self.jobs_waiting = Gauge("convlens_jobs_waiting_for_caller",
                                  "Optimisation jobs paused because their caller has not taken their last event "
                                  "(a stream reader that stopped reading; its companions go on without it).",
                                  registry=r)
        # TopActivations indexes (one scan per model x dataset x layer, then answered from the index).
        self.index_images_scanned = Counter("convlens_index_images_scanned_total",
                                            "Dataset images run through a model to build an index.",
                                            ["model", "dataset", "layer"], registry=r)
        self.index_build_progress = Gauge("convlens_index_build_progress",
                                          "Fraction of the dataset scanned by a running index build (0..1).",
                                          ["model", "dataset", "layer"], registry=r)
        self.index_builds = Counter("convlens_index_builds_total", "Index builds finished, by outcome.",
                                    ["model", "dataset", "layer", "outcome"], registry=r)
        self.index_loads = Counter("convlens_index_loads_total",
                                   "Indexes read from --index-dir instead of scanning.",
                                   ["model", "dataset", "layer"], registry=r)
