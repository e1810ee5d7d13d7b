"""mkdocs hook: tables rendered from featx's own registries at build time, so they cannot drift.

``<!-- featx:heads-grid -->`` in a page becomes the heads table of
:mod:`featx.heads.registry`: every registered head, its estimator as the registry builds it,
its grid in search order, whether it takes class weights and whether ``fit-heads`` fits it by
default.
"""
from __future__ import annotations

HEADS_MARK = "<!-- featx:heads-grid -->"


def _value(v) -> str:
    return format(v, "g") if isinstance(v, float) else str(v)


def heads_table() -> str:
    """The registry's heads as a markdown table (one row per head, in registry order)."""
    from featx.heads import DEFAULT_HEADS, get_head, list_heads
    lines = ["| head | fitted by default | estimator (as built, seed 0) | grid, in search order "
             "(first = most regularised; ties go to it) | class weights |",
             "| --- | --- | --- | --- | --- |"]
    for name in list_heads():
        spec = get_head(name)
        est = spec.build(0, None)
        # only the non-default parameters: sklearn's own compact repr
        grid = "; ".join(f"`{k}` " + ", ".join(_value(v) for v in values)
                         for k, values in spec.grid.items())
        if spec.fit_grid is not None:
            grid += " (narrowed to what a fit on n rows can take)"
        lines.append(f"| `{name}` | {'yes' if name in DEFAULT_HEADS else 'no (extra)'} "
                     f"| {spec.description}: `{est!r}` | {grid} "
                     f"| {'yes' if spec.supports_class_weight else 'no'} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if HEADS_MARK in markdown:
        markdown = markdown.replace(HEADS_MARK, heads_table())
    return markdown
