"""The OpenAI request fields batchrun does not implement: refused on their line, never silently ignored.

A field is accepted when absent or when its value asks for nothing (null, false, an empty list, "none"), so that
files written by the openai SDK, which sends explicit defaults, still run. Fields that do not change the
answer (user, metadata, store, service_tier, ...) are accepted whatever their value.
"""

from __future__ import annotations

from typing import Any

from batchrun.sampling import LineError

# Field → the values that ask for nothing beyond what batchrun does (None is always accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "audio": (),
    "echo": (False,),
    "function_call": ("none",),
    "functions": ([],),
    "modalities": (["text"],),
    "moderation": (),
    "prediction": (),
    "reasoning_effort": (),
    "stream_options": (),
    "suffix": ("",),
    "tool_choice": ("none",),
    "tools": ([],),
    "verbosity": (),
    "web_search_options": (),
}


def check_unsupported(obj: dict[str, Any], *, prefix: str) -> None:
    """Raises LineError naming the first field that asks for something batchrun does not do."""
    for name, accepted in UNSUPPORTED.items():
        value = obj.get(name)
        if value is not None and value not in accepted:
            raise LineError("unsupported_field", f"{prefix}{name}",
                            f"batchrun does not implement {name!r} (remove it, or set it to null)")
