"""Where do the plugins log? `logger`, named `rejoinder.livekit.plugin`.

livekit-agents' own plugins log to `livekit.plugins.<name>`. We do not: the CLI of livekit-agents
sets the whole `livekit` logger tree to WARNING (it counts it among its noisy loggers), so a logger
under it would depend on the framework for its level, and Rejoinder's loggers all live under
`rejoinder.`. The framework's convention that matters is kept: `RejoinderPlugin` hands this logger to
`livekit.agents.Plugin`, and the agents CLI sets a registered plugin's logger to the worker's log
level. As a child of `rejoinder.livekit` (the worker's logger), one
`logging.getLogger("rejoinder.livekit")` setting governs the worker and its plugins together.
"""
import logging

logger = logging.getLogger("rejoinder.livekit.plugin")
