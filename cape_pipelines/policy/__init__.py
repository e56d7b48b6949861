"""The policy format: models, loading, cape-python compatibility and JSON Schema."""

from .load import build_transformation, load_policy, policy_json_schema
from .models import Match, Policy, PolicyDocument, ResolvedAction, ResolvedRule, canonical_json

__all__ = [
    "Match",
    "Policy",
    "PolicyDocument",
    "ResolvedAction",
    "ResolvedRule",
    "build_transformation",
    "canonical_json",
    "load_policy",
    "policy_json_schema",
]
