"""The explanation control's labels for the ensemble's members (label_config/README.md).

A config names its layers as it likes to read them: a member's key (``0-resnet50``), its
architecture (``resnet50``) or its position (``model 1``); ``consensus`` is the overlap the
mask was cut from.
"""

from __future__ import annotations

from collections.abc import Sequence

from wsl_models.explanation import CONSENSUS


def layer_label(source: str, members: Sequence[str], labels: Sequence[str]) -> str | None:
    """The label that draws ``source`` (a member key, or CONSENSUS), or None (not drawn).

    By name first (any case: the member key, then its architecture, the key after its
    ``N-`` position), then by position: ``model 1`` for the first member."""
    by_name = {label.lower(): label for label in labels}
    if source == CONSENSUS:
        return by_name.get(CONSENSUS)
    arch = source.split("-", 1)[-1]
    unique_arch = sum(m.split("-", 1)[-1] == arch for m in members) == 1
    for name in (source, arch) if unique_arch else (source,):
        if name.lower() in by_name:
            return by_name[name.lower()]
    if source in members:
        return by_name.get(f"model {list(members).index(source) + 1}")
    return None
