"""A dataset's items as the core's catalogue items: what ``catalogue build``, the behaviour
index, the gate's retrieval cases, the full-catalogue evaluation and the /recommend bench all
build from, so every one of them sees the same items in the same order."""

from __future__ import annotations

from instructrec.catalogue import CatalogueItem
from instructrec.text import normalise


def catalogue_items(data) -> tuple[list[CatalogueItem], int]:
    """The items in item-id order (the same catalogue whatever order a loader kept), titles
    normalised as the service normalises candidates, categories as metadata; and how many were
    left out for having no title."""
    items, untitled = [], 0
    for item_id in sorted(data.items):
        item = data.items[item_id]
        title = normalise(item.title)
        if not title:
            untitled += 1
            continue
        items.append(CatalogueItem(str(item_id), title, {"categories": list(item.categories)} if item.categories else None))
    return items, untitled
