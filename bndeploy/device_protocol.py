"""What bndeploy's device server and every client of it share, whichever stage the client is in: the name
of the function an approved-only server answers with its policy, and how that answer reads."""

from __future__ import annotations

import json

POLICY_FUNCTION = "bndeploy.server.policy"  # an approved-only server registers it; TVM's own server has none


def read_policy(answer: str) -> dict:
    """{"libraries": "approved" | "any", "max_upload": bytes}, as the server's POLICY_FUNCTION returns it."""
    return json.loads(answer)


def loads_approved_only(policy: dict | None) -> bool:
    return policy is not None and policy.get("libraries") == "approved"
