"""`tailwise lineage diff A B`: two artifacts' lineages side by side.

Both chains are walked upstream and lined up by role: an artifact's place is the path of
input names that leads to it from the artifact compared (`allocation/metrics` is the
metrics that went into the allocation that went into it). At each place the producing
steps are compared field by field: step, version, each param, each input digest, git and
code revisions, container image. Run ids and timestamps always differ and say nothing
about what was computed, so they are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from steps.core.store import ArtifactStore, Manifest

STEP_FIELDS = ("step", "step_version", "git_revision", "code_revision", "container_image")
ITSELF = "itself"


@dataclass(frozen=True)
class Row:
    place: str
    field: str
    a: Any
    b: Any

    @property
    def equal(self) -> bool:
        return self.a == self.b


def chain(store: ArtifactStore, ref: str) -> dict[str, Manifest]:
    """Each artifact up the chain of `ref`, by its place (path of input names)."""
    places: dict[str, Manifest] = {}

    def visit(manifest: Manifest, place: str) -> None:
        places[place] = manifest
        if manifest.produced_by is not None:
            for name, digest in sorted(manifest.produced_by.inputs.items()):
                child = name if place == ITSELF else f"{place}/{name}"
                visit(store.stat(digest), child)

    visit(store.stat(ref), ITSELF)
    return places


def flat(params: dict[str, Any], prefix: str = "params.") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fields_of(manifest: Manifest | None) -> dict[str, Any]:
    """What is compared at one place: the artifact, and what made it."""
    if manifest is None:
        return {}
    made = manifest.produced_by
    values: dict[str, Any] = {"artifact": manifest.digest, "kind": manifest.kind}
    if made is None:
        return values | {"step": None}
    values |= {name: getattr(made, name) for name in STEP_FIELDS}
    values |= flat(made.params)
    values |= {f"inputs.{name}": digest for name, digest in made.inputs.items()}
    return values


def compare(store: ArtifactStore, ref_a: str, ref_b: str) -> tuple[str, str, list[Row]]:
    """The digests of A and B and one row per compared field, place by place."""
    chain_a, chain_b = chain(store, ref_a), chain(store, ref_b)
    places = sorted(set(chain_a) | set(chain_b),
                    key=lambda p: (p != ITSELF, p.count("/"), p))
    rows = []
    for place in places:
        a, b = fields_of(chain_a.get(place)), fields_of(chain_b.get(place))
        for name in dict.fromkeys([*a, *b]):
            rows.append(Row(place, name, a.get(name), b.get(name)))
    return chain_a[ITSELF].digest, chain_b[ITSELF].digest, rows


def shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return value if isinstance(value, str) else json.dumps(value)


def to_text(a: str, b: str, rows: list[Row]) -> str:
    """What differs, place by place, with A's value | B's; what is equal is named (a place
    equal in every field is one line)."""
    places: dict[str, list[Row]] = {}
    for row in rows:
        places.setdefault(row.place, []).append(row)
    differing = [r for r in rows if not r.equal]
    width = max((len(r.field) for r in differing), default=0)
    a_width = max((len(shown(r.a)) for r in differing), default=0)
    lines = [f"A {a[:12]}  B {b[:12]}: " + (
        f"{len(differing)} fields differ at "
        f"{sum(any(not r.equal for r in rs) for rs in places.values())} of {len(places)} places"
        if differing else "identical lineage")]
    for place, place_rows in places.items():
        equal = [r.field for r in place_rows if r.equal]
        if len(equal) == len(place_rows):
            lines.append(f"{place}: equal ({len(equal)} fields, artifact "
                         f"{shown(place_rows[0].a)})")
            continue
        lines.append(f"{place}:")
        lines += [f"  {r.field:<{width}}  {shown(r.a):<{a_width}} | {shown(r.b)}"
                  for r in place_rows if not r.equal]
        if equal:
            lines.append(f"  equal: {', '.join(equal)}")
    return "\n".join(lines)


def to_json(a: str, b: str, rows: list[Row]) -> dict[str, Any]:
    return {"a": a, "b": b,
            "rows": [{"place": r.place, "field": r.field, "a": r.a, "b": r.b, "equal": r.equal}
                     for r in rows],
            "differ": [{"place": r.place, "field": r.field} for r in rows if not r.equal]}
