"""Governance catalog helpers on the pipeline side: the tag scanner (:mod:`.scan`) and the
Apache Atlas exchange format (:mod:`.atlas`). Neither needs the coordinator to run."""
