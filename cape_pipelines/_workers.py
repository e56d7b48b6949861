"""Where each engine's workers run: on this host (local) or elsewhere (a remote cluster).

A plan shipped to workers carries key references (see
:meth:`cape_pipelines.seam.Binding.ship`). Keys that exist only in the driver
process can reach workers on this host through a private per-run directory,
but never workers on other machines; this module tells the two apart from
what each engine says about itself (Spark's master URL, Dask's scheduler and
worker addresses, Beam's runner). When in doubt it answers "remote": the
worst case is then an error naming the fix, never key bytes shipped.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from .keys import Workers


@lru_cache(maxsize=1)
def _own_addresses() -> frozenset[str]:
    """This host's names and addresses (for workers that listen on its own IP)."""
    names = {"localhost", socket.gethostname()}
    try:
        _, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
        names.update(aliases)
        names.update(addresses)
    except OSError:
        pass
    return frozenset(names)


def on_this_host(host: str | None) -> bool:
    """Whether ``host`` (a name or address) is this machine."""
    if not host:
        return False
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback or host in _own_addresses()
    except ValueError:
        return host in _own_addresses()


def spark_workers(sdf: Any) -> Workers:
    """Spark: ``local[...]`` masters, and clusters whose master is on this host, are local."""
    return spark_session_workers(sdf.sparkSession)


def spark_session_workers(session: Any) -> Workers:
    """:func:`spark_workers` for a SparkSession."""
    master = None
    try:
        master = session.sparkContext.master
    except Exception:  # Spark Connect has no SparkContext: the server runs the job
        master = None
    if not master:
        return Workers("spark", "a Spark Connect server", local=False)
    if master.startswith("local"):
        return Workers("spark", f"spark master {master}", local=True)
    hosts = [urlsplit(f"//{part}").hostname for part in master.split("://", 1)[-1].split(",")]
    local = master.startswith("spark://") and all(on_this_host(h) for h in hosts)
    return Workers("spark", f"spark master {master}", local=local)


def dask_workers() -> Workers:
    """Dask: the local schedulers, and a ``distributed`` cluster whose scheduler and workers
    are all on this host, are local."""
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return Workers("dask", "the local Dask scheduler", local=True)
    address = str(client.scheduler.address)
    if address.startswith("inproc://"):
        return Workers("dask", f"scheduler {address}", local=True)
    try:
        workers = list(client.scheduler_info().get("workers", {}))
    except Exception:
        workers = []
    hosts = [urlsplit(a).hostname for a in [address, *workers]]
    return Workers("dask", f"scheduler {address}", local=all(on_this_host(h) for h in hosts))


# Runners whose SDK workers are processes on the machine that runs the pipeline.
_LOCAL_BEAM_RUNNERS = {
    "DirectRunner",
    "SwitchingDirectRunner",
    "BundleBasedDirectRunner",
    "FnApiRunner",
    "PrismRunner",
}


def beam_workers(pipeline: Any) -> Workers:
    """Beam: the direct runners, and any runner with ``LOOPBACK`` workers, are local."""
    runner = type(getattr(pipeline, "runner", None)).__name__
    environment = None
    try:
        from apache_beam.options.pipeline_options import PortableOptions

        environment = pipeline.options.view_as(PortableOptions).environment_type
    except Exception:
        environment = None
    local = runner in _LOCAL_BEAM_RUNNERS or str(environment).upper() == "LOOPBACK"
    return Workers("beam", f"runner {runner}", local=local)


def this_host(engine: str) -> Workers:
    """Workers that are processes on this host (an embedded mini-cluster, a process pool)."""
    return Workers(engine, "worker processes on this host", local=True)


__all__ = [
    "beam_workers",
    "dask_workers",
    "on_this_host",
    "spark_session_workers",
    "spark_workers",
    "this_host",
]
