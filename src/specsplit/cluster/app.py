"""Serve's entry point for the deployment: ``build``, the Serve config's ``import_path``
(``specsplit.cluster.app:build``), called with the application's ``args``."""

from __future__ import annotations

from ray.serve import Application

from specsplit.cluster.replica import SpecsplitReplica


def build(args: dict) -> Application:
    """The application: the replicas' deployment bound to ``ClusterSpec.replica_args()``
    (its options come from the config's ``deployments`` entry)."""
    return SpecsplitReplica.bind(args)
