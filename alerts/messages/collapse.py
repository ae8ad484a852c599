"""Digest items collapsed per story (docs/policy.md): events of one digest that share a
``collapse_key`` are one item — the newest event's fields (by created_at, then id),
``updates`` = how many events it stands for, ``ids`` = all their ids, oldest first.
Events without a key are items of their own. Ordering, caps, Telegram fitting and the
subject's count then work on these items."""
from __future__ import annotations

from typing import Mapping, Sequence

from alerts.messages.render import as_utc


def collapse(events: Sequence[Mapping]) -> list[dict]:
    stories: dict[str, list[Mapping]] = {}
    items: list[dict] = []
    for event in events:
        key = event.get("collapse_key")
        if key is None:
            items.append({**event, "ids": (event["id"],), "updates": 1})
        else:
            stories.setdefault(key, []).append(event)
    for story in stories.values():
        story = sorted(story, key=_age)
        items.append({**story[-1], "ids": tuple(e["id"] for e in story), "updates": len(story)})
    return items


def _age(event: Mapping) -> tuple:
    return as_utc(event["created_at"]), event["id"]
