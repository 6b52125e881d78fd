"""Scale-out on Ray Serve: N engine replicas behind one OpenAI endpoint, on one machine or a Ray cluster.

Each replica is the same FastAPI app as `gemmakit serve` (app.py), built on the replica itself by a builder
function (`serve.ingress(builder)`), so it loads its own model, runs its own engine loop and continuous
batching, and answers /health, /metrics and the chat page. Ray's HTTP proxy spreads requests over the
replicas; streaming responses pass through it unchanged. Every response carries `X-Gemmakit-Replica`
(host:pid), so a client or a test can see who answered.

Two ways in:
- `gemmakit serve --replicas N [--cpus-per-replica C] [--gpus-per-replica G]` starts (or joins, with
  RAY_ADDRESS) a Ray cluster and runs `app_builder` with the command's options;
- `serve run deploy/ray-serve.yaml` (or `serve deploy` to a running cluster, KubeRay's RayService) uses the
  same `app_builder` through Ray Serve's config file; the README shows both.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from gemmakit.serve.server import ServeOptions

# Keys of the application builder's `args` (the YAML file's `args:`), with their defaults.
BUILD_DEFAULTS: dict[str, Any] = {
    "model": None, "dtype": "auto", "device": "cpu", "chat_format": "auto", "context": None, "quantize": "none",
    "compile": False, "max_batch": 8, "max_queue": 64, "api_key": None, "served_model_name": None,
    "replicas": 2, "cpus_per_replica": 1, "gpus_per_replica": 0,
}


def app_builder(args: dict[str, Any]) -> Any:
    """A Ray Serve application of `args["replicas"]` gemmakit replicas (see BUILD_DEFAULTS for the keys)."""
    from ray import serve

    unknown = set(args) - set(BUILD_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown gemmakit deployment args {sorted(unknown)}; known: {sorted(BUILD_DEFAULTS)}")
    a = {**BUILD_DEFAULTS, **args}
    options = ServeOptions(max_batch=a["max_batch"], max_queue=a["max_queue"], context=a["context"],
                           compile=a["compile"], api_key=a["api_key"] or os.environ.get("GEMMAKIT_API_KEY"),
                           model_name=a["served_model_name"])
    load_kwargs = {k: a[k] for k in ("model", "dtype", "device", "chat_format", "context", "quantize", "compile")}
    threads = max(1, int(a["cpus_per_replica"]))

    def build() -> Any:  # runs on each replica
        import torch

        from gemmakit.api import load
        from gemmakit.serve.app import create_app

        torch.set_num_threads(threads)
        return create_app(lambda: load(**load_kwargs), options)

    replica = type("GemmakitReplica", (), {"__doc__": "One gemmakit engine behind Ray Serve's proxy."})
    deployment = serve.deployment(
        serve.ingress(build)(replica), name="gemmakit", num_replicas=int(a["replicas"]),
        ray_actor_options={"num_cpus": a["cpus_per_replica"], "num_gpus": a["gpus_per_replica"]},
        max_ongoing_requests=a["max_batch"] + a["max_queue"])
    return deployment.bind()


def run_replicas(args: argparse.Namespace) -> None:
    """`gemmakit serve --replicas N`: a local Ray cluster (or RAY_ADDRESS's) serving N replicas until Ctrl-C."""
    import ray
    from ray import serve

    cpus = args.cpus_per_replica
    if not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus * args.replicas), include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = app_builder({"model": args.model, "dtype": args.dtype, "device": args.device,
                       "chat_format": args.chat_format, "context": args.context, "quantize": args.quantize,
                       "compile": args.compiled, "max_batch": args.max_batch, "max_queue": args.max_queue,
                       "api_key": args.api_key, "served_model_name": args.served_model_name,
                       "replicas": args.replicas, "cpus_per_replica": cpus,
                       "gpus_per_replica": args.gpus_per_replica})
    serve.run(app, name="gemmakit", route_prefix="/", blocking=True)
