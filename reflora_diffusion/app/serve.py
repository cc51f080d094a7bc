"""How the app is served: gradio's queue without its busy polling while nothing happens."""

from __future__ import annotations

IDLE_POLL_SECONDS = 0.05


def quiet_idle_queue(demo, seconds: float = IDLE_POLL_SECONDS):
    """Call after `demo.queue()`. Gradio's queue (6.x, not on Windows) looks for a new event every 1 ms and for
    progress to send every 10 ms even when nothing is queued: about 5 % of a core for an app nobody has open.
    Here it looks every `seconds` (and progress every 2 x `seconds`; gradio's Windows values): an event then
    waits at most that long to start, and the idle app uses almost no CPU."""
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):  # left alone if gradio renames it
        queue.sleep_when_free = max(queue.sleep_when_free, seconds)
    if queue is not None and hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 2 * seconds)
    return demo
