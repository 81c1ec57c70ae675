"""Step cards that unlock one after another, each with "restart from this step"."""
from __future__ import annotations

import logging
import traceback
from typing import Callable

from supervisely.app.widgets import Button, Card, Container, Text

from custom_net import augs
from custom_net.model import UnknownModelError
from custom_net.sly_seg_dataset import DataError

logger = logging.getLogger("train_dashboard")

# Input problems the engine and the SDK report with a message meant for the user.
USER_ERRORS = (DataError, augs.AugsConfigError, UnknownModelError, ValueError, FileNotFoundError)


class Step:
    """One card: ``controls`` are disabled once the step is done; ``reset()`` clears what it produced."""

    number: int = 0
    title: str = ""
    description: str = ""
    wizard: "Wizard"  # set by the Wizard

    def __init__(self, session):
        self.session = session
        self.done = False
        self.status = Text("", widget_id=self.wid("status"))
        self.status.hide()
        self.restart = Button("Restart from this step", button_type="warning", button_size="mini", plain=True,
                              icon="zmdi zmdi-rotate-left", widget_id=self.wid("restart"))
        self.restart.hide()
        self.controls: list = []
        self.card = Card(f"{self.number:02d}. {self.title}", self.description,
                         content=Container([*self.build(), self.status]), content_top_right=self.restart,
                         lock_message="Complete the previous step first", widget_id=self.wid("card"))

    def wid(self, name: str) -> str:
        return f"s{self.number:02d}_{name}"

    def build(self) -> list:
        """Create the widgets, set ``self.controls`` to the editable ones; return them in layout order."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget this step's result (called for this step and every later one on restart)."""

    def on_unlock(self) -> None:
        """The previous step is done: fill widgets that depend on it."""

    # ---- messages
    def error(self, text: str) -> None:
        self.status.set(text, status="error")
        self.status.show()

    def success(self, text: str) -> None:
        self.status.set(text, status="success")
        self.status.show()

    def info(self, text: str) -> None:
        self.status.set(text, status="info")
        self.status.show()

    def action(self, button: Button, requires_open: bool = True) -> Callable:
        """Decorator for a button handler: refuses when the card is locked (or done, if
        ``requires_open``) and turns input errors into a message on the card instead of a crash."""
        def register(func):
            @button.click
            def handler():
                if self.card.is_locked():
                    return self.error("Complete the previous step first.")
                if requires_open and self.done:
                    return self.error('This step is done: use "Restart from this step" to change it.')
                try:
                    func()
                except USER_ERRORS as e:
                    self.error(str(e))
                except Exception as e:  # a bug must not take the app down: show it and log the traceback
                    logger.error("%s failed:\n%s", self.title, traceback.format_exc())
                    self.error(f"Unexpected error: {type(e).__name__}: {e}")
            return handler
        return register


class Wizard:
    """Steps in order; completing one unlocks the next, restarting one resets it and every later one."""

    def __init__(self, steps: list[Step], can_restart: Callable[[], str | None]):
        self.steps = steps
        self._can_restart = can_restart  # returns a reason to refuse (e.g. training runs) or None
        for index, step in enumerate(steps):
            step.wizard = self
            if index:
                step.card.lock()
            step.restart.click(lambda i=index: self.restart_from(i))

    def complete(self, step: Step, message: str) -> None:
        step.done = True
        for widget in step.controls:
            widget.disable()
        step.restart.show()
        step.success(message)
        index = self.steps.index(step)
        if index + 1 < len(self.steps):
            following = self.steps[index + 1]
            following.card.unlock()
            following.on_unlock()

    def restart_from(self, index: int) -> None:
        if self.steps[index].card.is_locked():
            return  # not reached yet: nothing to restart
        reason = self._can_restart()
        if reason:
            return self.steps[index].error(reason)
        self.steps[index].session.forget_from(self.steps[index].number)
        for later_index, step in enumerate(self.steps[index:], start=index):
            step.reset()
            step.done = False
            for widget in step.controls:
                widget.enable()
            step.restart.hide()
            step.status.hide()
            if later_index > index:
                step.card.lock()
        self.steps[index].on_unlock()
