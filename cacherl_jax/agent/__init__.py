"""Agent side of CacheRL: tool environments and the tasks they run."""

from cacherl_jax.agent.environment import (
    Environment,
    ExecutedCall,
    ReferenceCall,
    Task,
    ToolError,
    ToolResult,
    Turn,
    execute_reference,
)
from cacherl_jax.agent.factory import make_environment

__all__ = [
    "Environment",
    "ExecutedCall",
    "ReferenceCall",
    "Task",
    "ToolError",
    "ToolResult",
    "Turn",
    "execute_reference",
    "make_environment",
]
