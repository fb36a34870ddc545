"""The one exception base of edge-agent.

Every error the agent raises on purpose (a bad config, a capture device that is
gone, a codec or spool failure, a store that refuses) derives from
`EdgeAgentError`, so code embedding the agent can catch them all in one place.
This module imports nothing of the project: everything else may import it.
"""

from __future__ import annotations

__all__ = ["EdgeAgentError"]


class EdgeAgentError(Exception):
    """Base of the errors edge-agent raises on purpose."""
