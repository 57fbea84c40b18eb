"""Tasks by name: `config.task` picks one; `register` adds one (a config file may define its own).

An empty `config.task` keeps the older configs' meaning: `config.objective` ('autoregressive' or
'diffusion'), or 'rho1' when `config.selective.enabled`.
"""
from __future__ import annotations

from pathways_jax import config as config_lib
from pathways_jax.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


def register(name: str):
  """Class decorator: `@register('my_task') class MyTask(Task): ...`."""
  def add(cls: type[Task]) -> type[Task]:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
      raise TypeError(f'register({name!r}) takes a subclass of pathways_jax.tasks.Task, got {cls!r}')
    old = _TASKS.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
      raise ValueError(f'task {name!r} is already registered ({old.__module__}.{old.__qualname__})')
    cls.name = name
    _TASKS[name] = cls
    return cls
  return add


def names() -> list[str]:
  return sorted(_TASKS)


def task_name(cfg) -> str:
  name = cfg.get('task') or ''
  if name:
    return name
  sel = cfg.get('selective')
  return 'rho1' if sel is not None and sel.enabled else cfg.objective


def get(name: str) -> type[Task]:
  if name not in _TASKS:
    raise config_lib.ConfigError(
        f'config.task={name!r} is not a task; known: {names()} (a task of your own: subclass '
        'pathways_jax.tasks.Task and decorate it with @pathways_jax.tasks.register(name) in the '
        'config file)')
  return _TASKS[name]


def make(cfg, model) -> Task:
  """The task `cfg` names, for `model`."""
  return get(task_name(cfg))(cfg, model)
