"""Named entries of one kind (models, datasets, optimizers), each remembering where it was
registered: the one mechanism behind `register_model`, `register_dataset` and
`register_optimizer`, which cnnlab's own entries go through too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cnnlab.base.errors import ConfigError


def origin(obj) -> str:
  """`module.qualname` of a registered function or class."""
  return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry:
  """{name: entry} of one `kind` ("model"), chosen by `config.<key>` ("model.name"), filled by
  `how` ("cnnlab.register_model").

  Registering a name again from the same module and object (a module imported twice) replaces
  the entry; from anywhere else it is a ConfigError. An unknown name is a ConfigError listing
  every registered name, with the module of each that is not cnnlab's."""

  def __init__(self, kind: str, key: str, how: str):
    self.kind, self.key, self.how = kind, key, how
    self._entries: dict[str, Any] = {}
    self._origins: dict[str, str] = {}
    self._modules: dict[str, str] = {}

  def add(self, name: str, entry: Any, source: Any) -> bool:
    """Registers `entry` under `name`, made by `source` (the class or function); returns whether
    it replaced an entry of the same origin."""
    old = self._origins.get(name)
    if old is not None and old != origin(source):
      raise ConfigError(f"{self.how}({name!r}): the name is taken by {old}; registered again "
                        f"by {origin(source)}: rename one of them.")
    self._entries[name], self._origins[name] = entry, origin(source)
    self._modules[name] = getattr(source, "__module__", "?")
    return old is not None

  def get(self, name) -> Any:
    if name in self._entries:
      return self._entries[name]
    listed = [n if m.split(".")[0] == "cnnlab" else f"{n} (from {m})"
              for n, m in self._modules.items()]
    raise ConfigError(f"config.{self.key}={name!r} is not a registered {self.kind}; choose one "
                      f"of: {', '.join(listed)}. Your own {self.kind} needs {self.how} in "
                      f"a module the config imports (config.imports).")

  def names(self) -> tuple[str, ...]:
    """Every registered name, in registration order (cnnlab's own first)."""
    return tuple(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[Any]:
    return iter(list(self._entries.values()))
