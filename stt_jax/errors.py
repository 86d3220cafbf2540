"""Reading an exception together with what it was raised from.

Library errors arrive wrapped: tensorstore's ValueError inside an orbax error, a gloo failure
inside a JaxRuntimeError inside our own. Deciding what happened (disk full, a lost peer
process, a damaged checkpoint) means looking at each link of the chain once.
"""

from __future__ import annotations

from collections.abc import Iterator


def chain(error: BaseException | None) -> Iterator[BaseException]:
  """`error`, then what it was raised from (`__cause__`, else `__context__`), each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__
