"""Route selection: public model names and aliases to candidate routes in priority order."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.api.config import RouteSpec


class Router:
    """Maps a requested model name to its routes, lowest `priority` first (config order on ties)."""

    def __init__(self, routes: Iterable[RouteSpec]) -> None:
        self.routes = tuple(routes)
        by_name: dict[str, list[RouteSpec]] = {}
        for r in sorted(self.routes, key=lambda r: r.priority):
            for name in dict.fromkeys((r.model, *r.aliases)):
                by_name.setdefault(name, []).append(r)
        self._by_name = {k: tuple(v) for k, v in by_name.items()}
        self.by_id = {r.id: r for r in self.routes}

    def candidates(self, model: str, kind: str) -> tuple[RouteSpec, ...]:
        """Routes serving `model` for this endpoint kind; empty when unknown."""
        return tuple(r for r in self._by_name.get(model, ()) if r.kind == kind)

    def knows(self, model: str) -> bool:
        """Whether any route serves this name (for either kind)."""
        return model in self._by_name

    def models(self) -> list[str]:
        """Public model ids (not aliases), in first-seen config order."""
        return list(dict.fromkeys(r.model for r in self.routes))
