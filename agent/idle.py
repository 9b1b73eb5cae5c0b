"""Is the caller still there? Prompting a silent caller, and ending the call when nobody answers.

While the agent listens (nobody speaks, nothing is being prepared, not muted, not on hold), the
watcher measures the silence since the last thing anyone said. After `idle_prompt_s` it asks
`idle_prompt` ("Are you still there?"); after `idle_max_prompts` unanswered prompts it says
`idle_goodbye` and ends the session (reason "user idle"). Any speech or typed text from the caller
resets the count. Each prompt is a `user_idle` event. Off when `idle_prompt_s` is 0.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .events import SessionState, UserIdle

if TYPE_CHECKING:
    from .config import CallSettings
    from .session import Session

log = logging.getLogger("rejoinder.agent.idle")

POLL_S = 0.1


class IdleWatcher:
    def __init__(self, session: Session, settings: CallSettings) -> None:
        self.s = session
        self.settings = settings
        self.prompts = 0  # unanswered prompts in a row
        self._quiet_since = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.settings.idle_prompt_s > 0

    def reset(self) -> None:
        """The caller said something (or typed): they are there."""
        self.prompts = 0
        self.touch()

    def touch(self) -> None:
        """Someone spoke: the silence starts again from now."""
        self._quiet_since = time.monotonic()

    def _waiting(self) -> bool:
        s = self.s
        return (s.state == SessionState.LISTENING and s.idle and not s.muted and s.speaker.answer is None
                and not s.speaker.holding)

    async def run(self) -> None:
        """The watcher's loop; the session owns the task and cancels it at shutdown."""
        cfg = self.settings
        while True:
            await asyncio.sleep(POLL_S)
            if not self._waiting():
                self.touch()
                continue
            idle_s = time.monotonic() - self._quiet_since
            if idle_s < cfg.idle_prompt_s:
                continue
            self.prompts += 1
            ending = self.prompts > cfg.idle_max_prompts
            log.info("[%s] caller silent for %.1f s (prompt %d%s)", self.s.session_id, idle_s, self.prompts,
                     ", ending" if ending else "")
            self.s.emit(UserIdle(self.s.session_id, prompts=self.prompts, idle_s=idle_s, ending=ending))
            if ending:
                self.s.speaker.say(cfg.idle_goodbye, interrupt=False, then_end="user idle")
                return
            self.s.speaker.say(cfg.idle_prompt, interrupt=False)
            self.touch()
